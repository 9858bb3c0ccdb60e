"""Builds the embedded default from a seed: world data, tokenizer, pre-trained model, report.

Layout written under `out` (the shipped copy is `checkpoints/world/`):

  data/facts.json                      every fact with its subject's split
  data/zsre_{train,val,test}.json      edit splits in the ZsRE / MEND layout
  data/counterfact_{train,val,test}.json  the same edits in the CounterFact (EasyEdit) layout
  data/unke_test.json                  50 UnKE (unstructured) edits: paragraphs of new facts
  model/                               Hugging Face Llama checkpoint + tokenizer
  world.json                           seed, sizes, settings and measured accuracies
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from typing import Callable

from horse_jax.errors import UserError
from horse_jax.io import atomic_write_json
from horse_jax.world import generator, pretrain, tokenizer as world_tokenizer

SPLITS = ("train", "val", "test")


def write_data(world: generator.World, folder: str) -> dict[str, str]:
  """Writes facts and edit splits; returns {name: path}."""
  paths = {}
  os.makedirs(folder, exist_ok=True)
  paths["facts"] = os.path.join(folder, "facts.json")
  atomic_write_json(paths["facts"], generator.facts_table(world), indent=None)
  for split in SPLITS:
    edits = world.edits[split]
    paths[f"zsre_{split}"] = os.path.join(folder, f"zsre_{split}.json")
    atomic_write_json(paths[f"zsre_{split}"], [generator.to_zsre(e) for e in edits], indent=1)
    paths[f"counterfact_{split}"] = os.path.join(folder, f"counterfact_{split}.json")
    atomic_write_json(paths[f"counterfact_{split}"],
                      [generator.to_counterfact(e, i) for i, e in enumerate(edits)], indent=1)
  paths["unke_test"] = os.path.join(folder, "unke_test.json")
  atomic_write_json(paths["unke_test"], generator.unke_records(world), indent=1)
  return paths


def evaluate(model, tok, world: generator.World, sample: int | None = None,
             seed: int = 0) -> dict[str, dict[str, float]]:
  """Accuracies of the pre-trained model on the world's question sets.

  Args:
    model: the world model.
    tok: its tokenizer.
    world: the world.
    sample: score a random sample of this many pairs per set (None: all).
    seed: sample seed.

  Returns:
    {"train_questions": ..., "heldout_phrasings": ..., "locality_questions": ...,
     "edit_prompts_true": ...} each from `pretrain.answer_accuracy`.
  """
  rng = random.Random(seed)
  edits = [e for s in SPLITS for e in world.edits[s]]
  sets = {
      "train_questions": generator.pretraining_pairs(world),
      "heldout_phrasings": generator.heldout_pairs(world),
      "locality_questions": [(e["loc_prompt"], e["loc_answer"]) for e in world.edits["test"]],
      "test_edit_prompts_true_answer": [(e["prompt"], e["ground_truth"]) for e in world.edits["test"]],
  }
  del edits
  out = {}
  for name, pairs in sets.items():
    if sample is not None and len(pairs) > sample:
      pairs = rng.sample(pairs, sample)
    out[name] = pretrain.answer_accuracy(model, tok, pairs) | {"n": len(pairs)}
  return out


def build(out: str, seed: int = 0, spec: generator.WorldSpec = generator.WorldSpec(),
          cfg: pretrain.PretrainConfig = pretrain.PretrainConfig(), vocab_size: int = 2048,
          ckpt_dir: str | None = None, log: Callable[[str], None] = print,
          eval_every: int = 500) -> dict:
  """Generates the world, trains tokenizer and model, evaluates, and writes everything to `out`.

  Args:
    out: output folder (created; `data/`, `model/`, `world.json` inside are replaced).
    seed: world, tokenizer-data and model seed.
    spec: world sizes.
    cfg: model and pre-training settings.
    vocab_size: BPE vocabulary size.
    ckpt_dir: orbax checkpoints for resuming pre-training (default `out/.pretrain_ckpt`,
      removed after a successful build).
    log: progress lines.
    eval_every: log accuracies on a 500-question sample every this many steps (0: never).

  Returns:
    The report written to `world.json`.
  """
  from horse_jax.models import from_pretrained, load_tokenizer, save_pretrained

  t0 = time.time()
  cpu0 = os.times()
  world = generator.build_world(seed, spec)
  pairs = generator.pretraining_pairs(world)
  write_data(world, os.path.join(out, "data"))
  log(f"world: {len(world.subjects)} subjects, {len(pairs)} pre-training questions, edits "
      + ", ".join(f"{s} {len(world.edits[s])}" for s in SPLITS))

  tok_dir = tempfile.mkdtemp(prefix="world-tok-")
  try:
    bpe = world_tokenizer.train_tokenizer([f"{q} {a}" for q, a in pairs], vocab_size)
    world_tokenizer.save_tokenizer(bpe, tok_dir)
    tok = load_tokenizer(tok_dir)
    ckpt_dir = ckpt_dir or os.path.join(out, ".pretrain_ckpt")
    rng = random.Random(seed)
    probe_train = rng.sample(pairs, 500)
    probe_heldout = rng.sample(generator.heldout_pairs(world), 500)

    def probe(model):
      a = pretrain.answer_accuracy(model, tok, probe_train)["full_answer_acc"]
      b = pretrain.answer_accuracy(model, tok, probe_heldout)["full_answer_acc"]
      return f"train questions {a:.3f}, held-out phrasings {b:.3f} (sample of 500)"

    model = pretrain.pretrain(tok, pairs, cfg, seed=seed, ckpt_dir=ckpt_dir, log=log,
                              eval_every=eval_every, eval_fn=probe)
    train_s = time.time() - t0
    model_dir = os.path.join(out, "model")
    save_pretrained(model, model_dir, tokenizer_src=tok_dir)
  finally:
    shutil.rmtree(tok_dir, ignore_errors=True)

  model = from_pretrained(model_dir)
  tok = load_tokenizer(model_dir)
  accuracies = evaluate(model, tok, world)
  cpu1 = os.times()
  n_params = sum(x.size for x in __import__("jax").tree_util.tree_leaves(model.params))
  report = {
      "seed": seed, "world": dataclasses.asdict(spec), "pretrain": dataclasses.asdict(cfg),
      "vocab_size": len(tok), "n_params": int(n_params),
      "model_bytes": os.path.getsize(os.path.join(model_dir, "model.safetensors")),
      "build_wall_s": round(time.time() - t0, 1), "train_wall_s": round(train_s, 1),
      "build_cpu_s": round((cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system)
                           - (cpu0.user + cpu0.system), 1),
      "accuracy": accuracies,
  }
  atomic_write_json(os.path.join(out, "world.json"), report)
  shutil.rmtree(ckpt_dir, ignore_errors=True)
  for name, acc in accuracies.items():
    log(f"{name:32s} n={acc['n']:6d} token_acc={acc['token_acc']:.4f} "
        f"full_answer={acc['full_answer_acc']:.4f} greedy_exact={acc['greedy_exact']:.4f}")
  return report


def default_world_dir() -> str:
  """The shipped world: `checkpoints/world` in the working directory, else beside the package."""
  here = os.path.join("checkpoints", "world")
  if os.path.isdir(here):
    return here
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(repo, "checkpoints", "world")


def load_world(folder: str) -> generator.World:
  """The world a built folder was generated from (its `world.json` seed and sizes).

  Args:
    folder: a folder written by `build` (`horse-jax world build`).

  Returns:
    The `generator.World` (regenerated from the seed: the same facts, splits and edits).
  """
  path = os.path.join(folder, "world.json")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} does not exist (build it with `horse-jax world build --out {folder}`)") from None
  except ValueError as err:
    raise UserError(f"{path}: not valid JSON ({err})") from None
  return generator.build_world(int(meta.get("seed", 0)), generator.WorldSpec(**meta.get("world", {})))
