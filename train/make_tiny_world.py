"""Builds a tiny synthetic editing world for a quick meta-training check (CPU, minutes).

Writes to OUT: `llama/` (a random tiny llama + a word-level tokenizer, HF format), `train.json`,
`valid.json` (ZsRE/MEND-format records; training and validation subjects are disjoint).

  python train/make_tiny_world.py /tmp/tiny_world
  horse-jax train --model /tmp/tiny_world/llama --data /tmp/tiny_world/train.json \
      --valid /tmp/tiny_world/valid.json --method horse --out /tmp/tiny_world/horse \
      --config train/tiny_world.yaml --steps 300 --save-every 50
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def build(out: str, n_subjects: int = 600, n_answers: int = 40, n_valid: int = 64, seed: int = 0) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  from horse_jax.models import save_pretrained
  import jax

  from horse_jax.models import Model
  from horse_jax.models.init import init_llama_params, tiny_llama_config

  rng = np.random.default_rng(seed)
  subjects = [f"s{i}" for i in range(n_subjects)]
  answers = [f"a{i}" for i in range(n_answers)]
  words = ["what", "is", "the", "colour", "of", "tell", "me", "which", "city", "has", "?", "q",
           "name", "capital", "where", "does", "live"] + subjects + answers
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
  tok_dir = os.path.join(out, "tokenizer")
  hf_tok.save_pretrained(tok_dir)
  cfg = tiny_llama_config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_layers=4)
  # std 0.2 rather than 0.02: a random net whose activations (keys) are O(1), as in a trained LM, so
  # the ridge term e^lamda I does not swamp K^T K.
  model = Model(init_llama_params(cfg, jax.random.PRNGKey(seed), std=0.2), cfg)
  save_pretrained(model, os.path.join(out, "llama"), tokenizer_src=tok_dir)

  order = rng.permutation(n_subjects)
  rows = []
  for i in order:
    s = subjects[i]
    other = subjects[rng.integers(n_subjects)]
    rows.append({"src": f"what is the colour of {s} ?",
                 "alt": " ".join(rng.choice(answers, rng.integers(1, 3))),
                 "rephrase": f"tell me the colour of {s} ?",
                 "loc": f"q which city has {other}", "loc_ans": str(rng.choice(answers)),
                 "answers": [str(rng.choice(answers))]})
  with open(os.path.join(out, "valid.json"), "w") as f:
    json.dump(rows[:n_valid], f, indent=1)
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(rows[n_valid:], f, indent=1)


if __name__ == "__main__":
  build(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/tiny_world")
