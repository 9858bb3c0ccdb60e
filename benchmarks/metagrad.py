"""HORSE meta-training across meshes and cache paths on the embedded world
(`horse-jax bench --only horse_metagrad_meshes`).

A fresh hypernetwork (seed 0) is meta-trained with a world recipe (default train/world_horse.yaml,
the shipped hypernetwork's: 1,000 edits per step, all four down_proj) in four ways: one device or a
2x4 mesh (CPU devices forced with JAX_NUM_CPU_DEVICES=8 on a CPU host), each with the cache
recomputed every step or gathered from the memo of the training records. Reported:

* the first step's meta-gradient of each way against one device recomputing (the largest relative
  Frobenius difference over the hypernetwork's parameter arrays; lamda, which HORSE does not train,
  has none);
* after `steps` steps: the hypernetworks' largest relative difference the same way, and the
  validation ES / GS / LS of `valid_n` zsre_val edits at once.

  JAX_NUM_CPU_DEVICES=8 python -m benchmarks.metagrad [--config train/world.yaml] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (name, mesh shape or None, cache from the memo)
WAYS = (("1x1", None, False), ("1x1 memo", None, True), ("2x4", (2, 4), False),
        ("2x4 memo", (2, 4), True))
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train",
                      "world_horse.yaml")


def max_rel(a, b) -> float:
  """Largest relative Frobenius difference ||a - b|| / ||b|| over the leaves of two pytrees (leaves
  of `b` that are all zero are skipped)."""
  out = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.float64(x), np.float64(y)
    ny = np.linalg.norm(y)
    if ny > 0:
      out = max(out, float(np.linalg.norm(x - y) / ny))
  return out


def metagrad_agreement(world_dir: str | None = None, config: str = RECIPE, steps: int = 3,
                       valid_n: int = 200, seed: int = 0, verbose: bool = False) -> dict[str, Any]:
  """First-step meta-gradients, hypernetworks after `steps` steps and their validation scores, for
  each way of `WAYS` (see the module docstring)."""
  from horse_jax.editors.hypernet.validation import validate
  from horse_jax.editors.protocol import resolve_settings
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import memo as memo_lib
  from horse_jax.editors.hypernet import program
  from horse_jax.editors.hypernet.data import MemoTokenizer, step_batches, step_indices
  from horse_jax.models import make_mesh, read_config, shard_model
  from horse_jax.runtime import load_model
  from horse_jax.world.build import default_world_dir
  if jax.device_count() < 8:
    raise RuntimeError("needs 8 devices (on a CPU host: JAX_NUM_CPU_DEVICES=8)")
  root = world_dir or default_world_dir()
  path = os.path.join(root, "model")
  model, tokenizer = load_model(path)
  resolved = resolve_settings("horse", path, read_config(path), configs=[config])
  cfg = hypernet.from_settings("horse", resolved, model)
  settings = resolved.tree()
  max_length, n_edits = settings["data"].get("max_length"), int(settings["data"]["n_edits"])
  train = load_records(os.path.join(root, "data", "zsre_train.json"))
  valid = load_records(os.path.join(root, "data", "zsre_val.json"), limit=valid_n)
  tok = MemoTokenizer(tokenizer)
  picked = [step_indices(seed, step, len(train), n_edits) for step in range(steps)]
  # The memo holds only the records these steps draw (memo row i of records[i]; indices remapped).
  used = np.unique(np.concatenate(picked))
  train = [train[i] for i in used]
  step_sets = []
  for idx in picked:
    idx = np.searchsorted(used, idx)
    recs = [train[i] for i in idx]
    step_sets.append((idx, recs, step_batches(tok, recs, cfg, max_length)))
  fresh = hypernet.init(cfg, jax.random.PRNGKey(seed))
  grads, nets, scores, seconds = {}, {}, {}, {}
  memos = {}
  for name, shape, use_memo in WAYS:
    start = time.perf_counter()
    mesh = None if shape is None else make_mesh(*shape)
    lm = model if mesh is None else shard_model(model, mesh)
    if use_memo and shape not in memos:
      memos[shape] = memo_lib.build(lm, tok, train, cfg, max_length, mesh)
    memo = memos.get(shape) if use_memo else None
    packer = hypernet.Packer(cfg.chunk, 8 if mesh is None else max(8, mesh.shape["data"]))
    state = jax.tree_util.tree_map(jnp.copy, fresh)
    if mesh is not None:
      state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for step, (idx, recs, sets) in enumerate(step_sets):
      rows = None if memo is None else memo_lib.step_rows(memo, tok, idx, recs, cfg, max_length,
                                                          batches=sets[0])
      if step == 0:
        rest = [program.put(packer(kind, b, cfg.token, kind == "edits"), mesh)
                for kind, b in zip(("edits", "rephrase", "loc"), sets)]
        g, _ = program.meta_grads_program(
            state, lm, None if memo else rest[0], rest[1], rest[2], cfg, mesh,
            memo=None if memo is None else memo.arrays,
            rows=None if rows is None else program.put(rows, mesh))
        grads[name] = jax.device_get(g)
      state, m = hypernet.train_step_async(state, lm, cfg, *sets, mesh=mesh, packer=packer,
                                           memo_rows=rows, memo=memo)
      hypernet.check_metrics(m)
    nets[name] = jax.device_get(state.nets)
    _, scores[name] = validate(state, lm, tokenizer, cfg, valid, max_length, mesh)
    seconds[name] = time.perf_counter() - start
    if verbose:
      print(f"{name}: {seconds[name]:.0f} s, grads vs 1x1 {max_rel(grads[name], grads['1x1']):.2e}, "
            f"nets vs 1x1 {max_rel(nets[name], nets['1x1']):.2e}, valid {scores[name]}",
            file=sys.stderr, flush=True)
  base = WAYS[0][0]
  return {"config": os.path.basename(config), "n_edits": n_edits, "steps": steps, "valid_n": len(valid),
          "seconds": seconds,
          "grads_vs_1x1": {w[0]: max_rel(grads[w[0]], grads[base]) for w in WAYS[1:]},
          "grads_memo_vs_recompute_2x4": max_rel(grads["2x4 memo"], grads["2x4"]),
          "nets_vs_1x1": {w[0]: max_rel(nets[w[0]], nets[base]) for w in WAYS[1:]},
          "valid": scores}


def bench_metagrad_agreement(world_dir: str | None = None) -> list[dict[str, Any]]:
  """`horse-jax bench` rows: one per way (its wall time: memo, first-step gradient, steps, validation)."""
  r = metagrad_agreement(world_dir)
  rows = []
  for name, secs in r["seconds"].items():
    v = r["valid"][name]
    agree = ("" if name == "1x1" else f"first-step grads vs 1x1 {r['grads_vs_1x1'][name]:.2e}; "
             f"hypernet after {r['steps']} steps vs 1x1 {r['nets_vs_1x1'][name]:.2e}; ")
    rows.append({"benchmark": "horse_metagrad_meshes",
                 "shape": f"{r['config']} N={r['n_edits']}, {r['steps']} steps, {name}",
                 "first_s": secs, "steady_s": float("nan"),
                 "throughput": f"{agree}valid ES/GS/LS {v['edit_acc']:.4f}/{v['rephrase_acc']:.4f}/"
                               f"{v['loc_acc']:.4f} (N={r['valid_n']})"})
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=RECIPE)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--valid-n", type=int, default=200)
  p.add_argument("--world", default=None)
  args = p.parse_args()
  import json
  print(json.dumps(metagrad_agreement(args.world, args.config, args.steps, args.valid_n,
                                       verbose=True), indent=1))


if __name__ == "__main__":
  main()
