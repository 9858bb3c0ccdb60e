"""Benchmarks of the compiled HORSE programs on the embedded world (`horse-jax bench` cases).

  horse_meta_step   one meta-training step of train/world_horse.yaml (1,000 edits, mini-batches of
                    100, rank 32, the four down_proj of the world model), its cache gathered from the
                    memo of the training records as `horse-jax train` does by default
  horse_meta_step_recompute   the same step recomputing its cache (the reference's way)
  horse_edit_1000   1,000 world edits at once with that hypernetwork configuration

Each reports compile time (AOT `lower().compile()`) apart from steady-state time (median of a few
runs of the compiled program), the host time to tokenize and pack one step (overlapped with the
previous step in `horse-jax train`), the program's FLOPs from XLA's cost analysis and the achieved
share of the CPU's nominal fp32 peak (`cpu_peak_flops`). XLA counts a while loop's body once, so
those FLOPs cover one LM chunk and one module of the programs' `lax.scan`s;
`python -m benchmarks.hypernet --unrolled-flops` also prints the whole programs'
FLOPs, counted on a second lowering with every scan unrolled (`scans_unrolled`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks.machine import cpu_peak_flops

# The world recipe (train/world_horse.yaml): all four down_proj, 1,000 edits per step in mini-batches
# of 100, rank 32, meta_lr 3e-4, hypernetwork chunks of 1,024 rows.
N_EDITS, LM_BATCH, RANK, META_LR, CHUNK = 1000, 100, 32, 3e-4, 1024


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


@contextlib.contextmanager
def scans_unrolled():
  """Inside this block every `lax.scan` / `lax.map` traced (by any module) is fully unrolled.

  Only for counting FLOPs: XLA's cost analysis counts a while loop's body once, an unrolled
  program's every iteration. The unrolled program is larger and slower to compile; nothing
  compiled inside should be kept for running.
  """
  from jax import lax
  scan, map_ = lax.scan, lax.map

  def scan_unrolled(f, init, xs=None, length=None, **kw):
    kw.pop("unroll", None)
    return scan(f, init, xs, length=length, unroll=True, **kw)

  def map_unrolled(f, xs, **kw):
    kw.pop("batch_size", None)
    return scan_unrolled(lambda carry, x: (carry, f(x)), (), xs)[1]

  lax.scan, lax.map = scan_unrolled, map_unrolled
  try:
    jax.clear_caches()  # traces cached with rolled loops must not be reused
    yield
  finally:
    lax.scan, lax.map = scan, map_
    jax.clear_caches()


def unrolled_flops(jitted, *args, **kwargs) -> float:
  """FLOPs of the whole program `jitted(*args, **kwargs)`, every loop iteration counted."""
  with scans_unrolled():
    return _flops(jitted.lower(*args, **kwargs).compile())


def world_setup(world_dir: str | None = None) -> dict[str, Any]:
  """World model, tokenizer, training records and the recipe's HypernetConfig."""
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.models import from_pretrained, load_tokenizer
  from horse_jax.models.names import default_edit_modules
  from horse_jax.world.build import default_world_dir
  root = world_dir or default_world_dir()
  path = os.path.join(root, "model")
  model = from_pretrained(path)
  mods = tuple(default_edit_modules(model.config, model.config.num_layers))
  cfg = hypernet.HypernetConfig(method="horse", modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=RANK,
                                meta_lr=META_LR, chunk=CHUNK, lm_batch=LM_BATCH)
  return {"model": model, "tokenizer": load_tokenizer(path), "cfg": cfg,
          "train": load_records(os.path.join(root, "data", "zsre_train.json"))}


def _row(name, shape, compile_s, steady, flops, host_s, extra="", cpu=()):
  peak = cpu_peak_flops()
  med = statistics.median(steady)
  cpu_s = statistics.median(cpu) if cpu else float("nan")
  extra += (f"; {len(steady)} runs, fastest {min(steady):.3f} s, slowest {max(steady):.3f} s; "
            f"process CPU {cpu_s:.2f} s/run; load {os.getloadavg()[0]:.1f}")
  return {"benchmark": name, "shape": shape, "first_s": compile_s + med, "compile_s": compile_s,
          "steady_s": med, "fastest_s": min(steady), "slowest_s": max(steady), "cpu_s": cpu_s, "host_s": host_s, "flops": flops,
          "gflops_per_s": flops / med / 1e9,
          "peak_share": flops / med / peak,
          "throughput": f"{flops / 1e9:,.1f} GFLOP, {flops / med / 1e9:,.1f} GFLOP/s = "
                        f"{100 * flops / med / peak:.0f}% of {peak / 1e9:,.0f} GFLOP/s peak{extra}"}


def bench_meta_step(setup: dict[str, Any], steps: int = 10, memo: bool = True) -> list[dict[str, Any]]:
  """One compiled HORSE meta-training step on the world recipe (median of `steps` steps: on a
  shared 2-core box single steps vary by +-20%).

  With `memo` (what `horse-jax train` does by default) the step gathers its cache from the memo of
  the training records (`hypernet.memo`), built once before (its time is reported apart); without,
  it recomputes the cache every step as the reference does (`horse_meta_step_recompute`).
  """
  from horse_jax.editors.hypernet.data import step_batches, step_indices
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import memo as memo_lib
  from horse_jax.editors.hypernet import program
  model, cfg, train = setup["model"], setup["cfg"], setup["train"]
  tok = hypernet.data.MemoTokenizer(setup["tokenizer"])
  packer = hypernet.Packer(cfg.chunk)
  start = time.perf_counter()
  cache_memo = memo_lib.build(model, tok, train, cfg) if memo else None
  jax.block_until_ready(cache_memo.arrays if memo else ())
  memo_s = time.perf_counter() - start

  def prep(step):
    idx = step_indices(0, step, len(train), N_EDITS)
    recs = [train[i] for i in idx]
    e, r, l = step_batches(tok, recs, cfg, None)
    rest = [program.put(packer(n, b, cfg.token, False)) for n, b in (("rephrase", r), ("loc", l))]
    if memo:
      return [cache_memo.arrays, memo_lib.put(memo_lib.step_rows(cache_memo, tok, idx, recs, cfg))] + rest
    return [program.put(packer("edits", e, cfg.token, True))] + rest

  fn = program.train_program_memo if memo else program.train_program
  for step in range(steps + 1):  # settle the packer's shapes (they only grow)
    prep(step)
  host = []
  for step in range(steps + 1):
    start = time.perf_counter()
    data = prep(step)
    host.append(time.perf_counter() - start)
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = fn.lower(state, model, *data, cfg).compile()
  compile_s = time.perf_counter() - start
  steady, cpu = [], []
  for step in range(steps + 1):
    data = prep(step)
    start, start_cpu = time.perf_counter(), time.process_time()
    state, m = compiled(state, model, *data)
    jax.block_until_ready((state, m))
    if step:  # the first run pays one-time allocation
      steady.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  rows = data[-2].input_ids.shape[0]
  shape = (f"N={N_EDITS} edits/step, mini-batches of {LM_BATCH}, rank {RANK}, {len(cfg.modules)} "
           f"down_proj; " + (f"cache from the memo of {len(train):,} records ({memo_s:.1f} s once)"
                             if memo else "cache recomputed") + f"; rephrase rows {rows}x32")
  name = "horse_meta_step" if memo else "horse_meta_step_recompute"
  return [_row(name, shape, compile_s, steady, _flops(compiled),
               statistics.median(host[1:]), f"; host prep {statistics.median(host[1:]):.2f} s", cpu)]


def bench_edit(setup: dict[str, Any], repeats: int = 3) -> list[dict[str, Any]]:
  """1,000 world edits at once: one compiled program (cache, normalizer, shifts)."""
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import program
  model, cfg, train = setup["model"], setup["cfg"], setup["train"]
  tok = setup["tokenizer"]
  start = time.perf_counter()
  batches = hypernet.edit_batches(tok, train[:N_EDITS], cfg.lm_batch)
  packed = program.put(hypernet.Packer(cfg.chunk)("edits", batches, cfg.token, True))
  host_s = time.perf_counter() - start
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = program.edit_program.lower(state.nets, state.norms, model, packed, cfg).compile()
  compile_s = time.perf_counter() - start
  steady, cpu = [], []
  for i in range(repeats + 1):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(state.nets, state.norms, model, packed))
    if i:
      steady.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  return [_row("horse_edit_1000", f"N={N_EDITS} world edits at once, {len(cfg.modules)} down_proj",
               compile_s, steady, _flops(compiled), host_s, f"; host tokenize+pack {host_s:.2f} s",
               cpu)]


def _world_flops(setup: dict[str, Any]) -> dict[str, float]:
  """Whole-program FLOPs (`unrolled_flops`) of the meta-step and the 1,000-edit edit."""
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import program
  from horse_jax.editors.hypernet.data import step_batches, step_indices
  model, cfg, train = setup["model"], setup["cfg"], setup["train"]
  packer = hypernet.Packer(cfg.chunk)
  recs = [train[i] for i in step_indices(0, 0, len(train), N_EDITS)]
  e, r, l = step_batches(hypernet.data.MemoTokenizer(setup["tokenizer"]), recs, cfg, None)
  sets = [program.put(packer(n, b, cfg.token, n == "edits"))
          for n, b in (("edits", e), ("rephrase", r), ("loc", l))]
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  from horse_jax.editors.hypernet import memo as memo_lib
  idx = step_indices(0, 0, len(train), N_EDITS)
  tok = hypernet.data.MemoTokenizer(setup["tokenizer"])
  cache_memo = memo_lib.build(model, tok, [train[i] for i in idx], cfg)
  rows = memo_lib.put(memo_lib.step_rows(cache_memo, tok, np.arange(N_EDITS), recs, cfg))
  return {"horse_meta_step": unrolled_flops(program.train_program_memo, state, model,
                                            cache_memo.arrays, rows, *sets[1:], cfg=cfg),
          "horse_meta_step_recompute": unrolled_flops(program.train_program, state, model, *sets,
                                                      cfg=cfg),
          "horse_edit_1000": unrolled_flops(program.edit_program, state.nets, state.norms, model,
                                            sets[0], cfg=cfg)}


def main() -> None:
  """python -m benchmarks.hypernet [--unrolled-flops]: both cases as a markdown table."""
  setup = world_setup()
  rows = bench_meta_step(setup) + bench_meta_step(setup, memo=False) + bench_edit(setup)
  if "--unrolled-flops" in sys.argv[1:]:
    for name, flops in _world_flops(setup).items():
      print(f"{name}: {flops / 1e9:.1f} GFLOP for the whole program (every scan iteration counted)")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"load average at the end: {load:.2f} ({os.cpu_count()} CPUs)")
  print("| case | compile (s) | steady (s, median) | fastest (s) | process CPU (s) | host prep (s) | GFLOP | share of peak |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['benchmark']} | {r['compile_s']:.2f} | {r['steady_s']:.3f} | {r['fastest_s']:.3f} | {r['cpu_s']:.2f} | "
          f"{r['host_s']:.2f} | {r['flops'] / 1e9:.1f} | {100 * r['peak_share']:.0f}% |")


if __name__ == "__main__":
  main()
