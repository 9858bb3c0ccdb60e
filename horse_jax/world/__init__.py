"""The embedded default: a synthetic world of facts and a small Llama pre-trained to know it.

  generator.py  seeded world (subjects, relations, templates, edit splits) and its JSON exports
  tokenizer.py  byte-level BPE trained on the world, saved for AutoTokenizer
  pretrain.py   answer-only pre-training of the Llama (optax AdamW, orbax checkpoints) and accuracy
  build.py      all of it into one folder (`horse-jax world build`)
"""
