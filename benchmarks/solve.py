"""HORSE's ridge solve across meshes on the embedded world (`horse-jax bench --only horse_solve_meshes`).

The shipped world hypernetwork edits N test records (default 1,000) once per mesh (one device, 1x8,
2x4; the 8 devices are CPU devices forced with JAX_NUM_CPU_DEVICES=8 on a CPU host), and each
module's shift is compared with the one-device shift and with a float64 NumPy solve of the same
system S = (K^T K + e^lamda I)^{-1} K^T D (that mesh's own cached K and spread D, float32 values).
Reported: the largest relative difference (Frobenius) over the four modules, the system's condition
number, and how far the float64 solutions of the meshes' systems are apart (what the caches' own
mesh-to-mesh rounding moves the exact answer by).

  JAX_NUM_CPU_DEVICES=8 python -m benchmarks.solve [--n-edits 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import numpy as np

MESHES = (None, (1, 8), (2, 4))


def _systems(nets, norms, cache, cfg, chunk):
  """(K, spread D, lamda) of every module, as `shifts.solve_stacked` solves them."""
  from horse_jax.editors.hypernet import shifts as sl
  out = []
  for run, k_run, g_run in zip(sl.module_runs(cfg), cache.keys, cache.grads):
    skey = cfg.shape_keys[run[0]]
    net, norm = nets[skey], norms[skey]
    m_run, _ = sl.run_inputs(cfg, run)
    ds = [sl.value_diffs(net, norm, m_run[j], k_run[j], g_run[j], chunk) for j in range(len(run))]
    for j in range(len(run)):
      d = ds[j]
      if cfg.method == "horse" and j > 0:
        d = sl.spread_one(d, ds[j - 1], g_run[j - 1], cfg.spread, True)
      out.append((k_run[j], d, net["lamda"][m_run[j]]))
  return out


def mesh_agreement(world_dir: str | None = None, n_edits: int = 1000) -> dict[str, Any]:
  """Shifts of the shipped world hypernetwork on each mesh of `MESHES` and their float64 solves."""
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import program
  from horse_jax.editors.hypernet.checkpoint import load_hypernet
  from horse_jax.models import from_pretrained, load_tokenizer, make_mesh, shard_model
  from horse_jax.world.build import default_world_dir
  if jax.device_count() < 8:
    raise RuntimeError("needs 8 devices (on a CPU host: JAX_NUM_CPU_DEVICES=8)")
  root = world_dir or default_world_dir()
  model = from_pretrained(os.path.join(root, "model"))
  tok = load_tokenizer(os.path.join(root, "model"))
  cfg, state, _ = load_hypernet(os.path.join(root, "hypernet"))
  records = load_records(os.path.join(root, "data", "zsre_test.json"), limit=n_edits)
  batches = hypernet.edit_batches(tok, records, cfg.lm_batch)
  systems_fn = jax.jit(_systems, static_argnames=("cfg", "chunk"))
  cache_fn = jax.jit(program.cache_rows, static_argnames=("cfg", "mesh"))
  shifts, systems, seconds = {}, {}, {}
  for shape in MESHES:
    mesh = None if shape is None else make_mesh(*shape)
    lm = model if mesh is None else shard_model(model, mesh)
    st = state if mesh is None else jax.device_put(
        state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    packed = hypernet.Packer(cfg.chunk, 8)("edits", batches, cfg.token, True)
    dev = program.put(packed, mesh)
    start = time.perf_counter()
    out, _ = program.edit_program(st.nets, st.norms, lm, dev, cfg, mesh)
    shifts[shape] = [np.float64(out[n]) for n in cfg.modules]
    seconds[shape] = time.perf_counter() - start
    cache, norms = cache_fn(lm, st.norms, dev, cfg=cfg, mesh=mesh)
    sys_ = systems_fn(st.nets, norms, cache, cfg=cfg, chunk=program._chunk(cfg, dev.rows.shape[0]))
    systems[shape] = [tuple(np.float64(x) for x in s) for s in sys_]
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  exact, cond = {}, []
  for shape in MESHES:
    exact[shape] = []
    for k, d, lam in systems[shape]:
      a = k.T @ k + np.exp(lam) * np.eye(k.shape[1])
      exact[shape].append(np.linalg.solve(a, k.T @ d))
      if shape is None:
        cond.append(float(np.linalg.cond(a)))
  name = lambda s: "1x1" if s is None else f"{s[0]}x{s[1]}"
  return {"n_edits": n_edits, "rows": int(systems[None][0][0].shape[0]), "cond": cond,
          "seconds": {name(s): seconds[s] for s in MESHES},
          "vs_1x1": {name(s): max(map(rel, shifts[s], shifts[None])) for s in MESHES[1:]},
          "vs_float64": {name(s): max(map(rel, shifts[s], exact[s])) for s in MESHES},
          "float64_vs_1x1": {name(s): max(map(rel, exact[s], exact[None])) for s in MESHES[1:]}}


def bench_mesh_agreement(world_dir: str | None = None, n_edits: int = 1000) -> list[dict[str, Any]]:
  """`horse-jax bench` rows: one per mesh (time of its first edit call, incl. compile)."""
  r = mesh_agreement(world_dir, n_edits)
  rows = []
  for mesh, secs in r["seconds"].items():
    extra = "" if mesh == "1x1" else (f"; vs 1x1 {r['vs_1x1'][mesh]:.2e}; float64 solutions of the "
                                      f"two caches differ by {r['float64_vs_1x1'][mesh]:.2e}")
    rows.append({"benchmark": "horse_solve_meshes", "shape": f"N={n_edits} world edits, mesh {mesh}",
                 "first_s": secs, "steady_s": float("nan"),
                 "throughput": f"max rel. diff of the shifts vs float64 {r['vs_float64'][mesh]:.2e}"
                               f"{extra}; cond {max(r['cond']):.2g}"})
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n-edits", type=int, default=1000)
  p.add_argument("--world", default=None)
  args = p.parse_args()
  import json
  print(json.dumps(mesh_agreement(args.world, args.n_edits), indent=1))


if __name__ == "__main__":
  main()
