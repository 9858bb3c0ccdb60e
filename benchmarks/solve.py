"""HORSE's ridge solve across meshes on the embedded world (`horse-jax bench --only horse_solve_meshes`).

The shipped world hypernetwork edits N test records (default 1,000) once per mesh (one device, 1x8,
2x4; the 8 devices are CPU devices forced with JAX_NUM_CPU_DEVICES=8 on a CPU host), and each
module's shift is compared with the one-device shift and with a float64 NumPy solve of the same
system S = (K^T K + e^lamda I)^{-1} K^T D (that mesh's own cached K and spread D, float32 values).
Reported: the largest relative difference (Frobenius) over the four modules, the system's condition
number, and how far the float64 solutions of the meshes' systems are apart (what the caches' own
mesh-to-mesh rounding moves the exact answer by).

The same edit also runs on two local processes x 4 CPU devices joined on one 2x4 mesh
(`jax.distributed` over gloo, as `tests/test_multihost.py` runs them): each process is started as
`python -m benchmarks.solve --worker ...`, process 0 writes the shifts and systems, and they are
compared like a mesh's (`--no-processes` leaves that run out).

  JAX_NUM_CPU_DEVICES=8 python -m benchmarks.solve [--n-edits 1000] [--no-processes]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import numpy as np

MESHES = (None, (1, 8), (2, 4))
TWO_PROCESSES = "2 processes x 4 (2x4)"


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


def _world(world_dir, n_edits, mesh=None):
  """(model, tokenizer, cfg, state, edit batches) of the shipped world hypernetwork's N test edits
  (model sharded and state replicated over `mesh`, which may span processes)."""
  from horse_jax import distributed
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet.checkpoint import load_hypernet
  from horse_jax.runtime import load_model
  from horse_jax.world.build import default_world_dir
  root = world_dir or default_world_dir()
  model, tok = load_model(os.path.join(root, "model"), mesh=mesh)
  cfg, state, _ = load_hypernet(os.path.join(root, "hypernet"))
  state = distributed.replicate(state, mesh)
  records = load_records(os.path.join(root, "data", "zsre_test.json"), limit=n_edits)
  return model, tok, cfg, state, hypernet.edit_batches(tok, records, cfg.lm_batch)


def _shifts_and_systems(model, cfg, state, batches, mesh):
  """(shifts per module, (K, spread D, lamda) per module as float64 NumPy, seconds of the edit
  program's first call) on `mesh` (None: one device)."""
  from horse_jax import distributed
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import program
  packed = hypernet.Packer(cfg.chunk, 8)("edits", batches, cfg.token, True)
  dev = program.put(packed, mesh)
  start = time.perf_counter()
  out, _ = program.edit_program(state.nets, state.norms, model, dev, cfg, mesh)
  shifts = [np.float64(distributed.to_host(out[n])) for n in cfg.modules]
  seconds = time.perf_counter() - start
  cache, norms = jax.jit(program.cache_rows, static_argnames=("cfg", "mesh"))(
      model, state.norms, dev, cfg=cfg, mesh=mesh)
  sys_ = jax.jit(_systems, static_argnames=("cfg", "chunk"))(
      state.nets, norms, cache, cfg=cfg, chunk=program._chunk(cfg, dev.rows.shape[0]))
  systems = [tuple(np.float64(distributed.to_host(x)) for x in s) for s in sys_]
  return shifts, systems, seconds


def worker(out: str, coordinator: str, process_id: int, world_dir: str | None, n_edits: int) -> None:
  """One of two processes x 4 CPU devices joined on a 2x4 mesh: process 0 writes the shifts and
  systems to `out` (.npz)."""
  from horse_jax import distributed
  from horse_jax.models import make_mesh
  distributed.initialize(coordinator, 2, process_id)
  mesh = make_mesh(2, 4)
  model, _, cfg, state, batches = _world(world_dir, n_edits, mesh)
  shifts, systems, seconds = _shifts_and_systems(model, cfg, state, batches, mesh)
  if process_id == 0:
    arrays = {f"shift{i}": s for i, s in enumerate(shifts)}
    for i, (k, d, lam) in enumerate(systems):
      arrays.update({f"keys{i}": k, f"diffs{i}": d, f"lamda{i}": lam})
    np.savez(out, seconds=seconds, **arrays)


def two_processes(world_dir: str | None, n_edits: int, timeout: float = 900):
  """(shifts, systems, seconds) of the same edit by two local processes x 4 CPU devices (gloo) on
  one 2x4 mesh (`worker`)."""
  import socket
  import subprocess
  import sys
  import tempfile
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "two_processes.npz")
    cmd = lambda i: [sys.executable, "-m", "benchmarks.solve", "--worker", out, "--coordinator",
                     f"127.0.0.1:{port}", "--process-id", str(i), "--n-edits", str(n_edits),
                     *(["--world", world_dir] if world_dir else [])]
    procs = [subprocess.Popen(cmd(i), env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
      raise RuntimeError("two-process solve failed:\n" + "\n".join(log[-3000:] for log in logs))
    z = np.load(out)
    n = sum(1 for k in z.files if k.startswith("shift"))
    return ([z[f"shift{i}"] for i in range(n)],
            [(z[f"keys{i}"], z[f"diffs{i}"], z[f"lamda{i}"]) for i in range(n)], float(z["seconds"]))


def mesh_agreement(world_dir: str | None = None, n_edits: int = 1000,
                   processes: bool = True) -> dict[str, Any]:
  """Shifts of the shipped world hypernetwork on each mesh of `MESHES` (and, with `processes`, on
  two processes x 4 devices) and their float64 solves."""
  from horse_jax.models import make_mesh, shard_model
  if jax.device_count() < 8:
    raise RuntimeError("needs 8 devices (on a CPU host: JAX_NUM_CPU_DEVICES=8)")
  model, _, cfg, state, batches = _world(world_dir, n_edits)
  shifts, systems, seconds = {}, {}, {}
  for shape in MESHES:
    mesh = None if shape is None else make_mesh(*shape)
    lm = model if mesh is None else shard_model(model, mesh)
    st = state if mesh is None else jax.device_put(
        state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    shifts[shape], systems[shape], seconds[shape] = _shifts_and_systems(lm, cfg, st, batches, mesh)
  ways = list(MESHES)
  if processes:
    ways.append(TWO_PROCESSES)
    shifts[TWO_PROCESSES], systems[TWO_PROCESSES], seconds[TWO_PROCESSES] = two_processes(
        world_dir, n_edits)
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  exact, cond = {}, []
  for way in ways:
    exact[way] = []
    for k, d, lam in systems[way]:
      a = k.T @ k + np.exp(lam) * np.eye(k.shape[1])
      exact[way].append(np.linalg.solve(a, k.T @ d))
      if way is None:
        cond.append(float(np.linalg.cond(a)))
  name = lambda s: s if isinstance(s, str) else "1x1" if s is None else f"{s[0]}x{s[1]}"
  return {"n_edits": n_edits, "rows": int(systems[None][0][0].shape[0]), "cond": cond,
          "seconds": {name(s): seconds[s] for s in ways},
          "vs_1x1": {name(s): max(map(rel, shifts[s], shifts[None])) for s in ways[1:]},
          "vs_float64": {name(s): max(map(rel, shifts[s], exact[s])) for s in ways},
          "float64_vs_1x1": {name(s): max(map(rel, exact[s], exact[None])) for s in ways[1:]}}


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
  p.add_argument("--no-processes", action="store_true", help="leave out the two-process run")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # two_processes' children
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    worker(args.worker, args.coordinator, args.process_id, args.world, args.n_edits)
    return
  import json
  print(json.dumps(mesh_agreement(args.world, args.n_edits, not args.no_processes), indent=1))


if __name__ == "__main__":
  main()
