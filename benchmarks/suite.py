"""The `horse-jax bench` suite: the hot paths timed, written as markdown tables (never asserted).

Each benchmark is a function `(world) -> list of row dicts`; `run(names, ...)` times them after a
warm-up call (so compile time is reported separately from steady-state time) and returns the rows.
Shapes default to what fits a 2-core CPU in about a minute; `reference=True` adds reference-scale
shapes (Llama-3-8B down_proj: d_k 14336, 11008 for Llama-2) that need an accelerator.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, float]:
  """(first-call seconds incl. compile, best steady-state seconds)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return first, best


def bench_forward(world, reference=False):
  """Teacher-forced forward of the world model (the evaluation hot path)."""
  from horse_jax.models import apply
  model = world["model"]
  fwd = jax.jit(apply)
  rows = []
  for b, t in ((64, 32), (256, 32)):
    ids = jnp.ones((b, t), jnp.int32)
    first, best = _timed(lambda: fwd(model, ids))
    rows.append({"benchmark": "forward", "shape": f"B={b} T={t}", "first_s": first, "steady_s": best,
                 "throughput": f"{b * t / best:,.0f} tokens/s"})
  return rows


def bench_generate(world, reference=False):
  """Greedy decoding with the KV cache."""
  from horse_jax.models import generate
  model = world["model"]
  rows = []
  for b, new in ((32, 16),):
    ids = jnp.ones((b, 16), jnp.int32)
    first, best = _timed(lambda: generate(model, ids, None, new))
    rows.append({"benchmark": "generate", "shape": f"B={b} prompt=16 new={new}", "first_s": first,
                 "steady_s": best, "throughput": f"{b * new / best:,.0f} new tokens/s"})
  return rows


def bench_ridge_solve(world, reference=False):
  """The closed-form shift S = (K^T K + e^lamda I)^{-1} K^T D (Cholesky and refinement, float32)."""
  from horse_jax.editors.hypernet.shifts import REFINE_STEPS, ridge_solve
  solve = jax.jit(ridge_solve)
  shapes = [(2048, 384, 128), (16384, 2048, 512)]
  if reference:
    shapes.append((16384, 11008, 4096))
  rows = []
  for r, k, v in shapes:
    keys = jax.random.normal(jax.random.PRNGKey(0), (r, k), jnp.float32)
    diffs = jax.random.normal(jax.random.PRNGKey(1), (r, v), jnp.float32)
    first, best = _timed(lambda: solve(keys, diffs, jnp.float32(0.0)), repeats=2)
    # gram, factor, K^T D and the first solve; per refinement the residual K^T (D - K X) and a solve
    flops = 2 * r * k * k + k ** 3 / 3 + 2 * r * k * v + 2 * k * k * v
    flops += REFINE_STEPS * (4 * r * k * v + 2 * k * k * v)
    rows.append({"benchmark": "ridge_solve", "shape": f"rows={r} d_k={k} d_v={v}", "first_s": first,
                 "steady_s": best, "throughput": f"{flops / best / 1e9:,.1f} GFLOP/s"})
  return rows


def bench_hopfield(world, reference=False):
  """Batched damped-Hopfield retrieval (vmapped over queries) against a codebook."""
  from horse_jax.editors.codebook.retrieval import retrieve_batch
  fn = jax.jit(lambda q, keys, count: retrieve_batch(q, keys, count, alpha=0.1, beta=20.0, eps=1e-5,
                                                    max_iter=1, threshold=0.7, normalize=True).index)
  rows = []
  sizes = (1024, 16384, 65536)
  for c in sizes:
    keys = jax.random.normal(jax.random.PRNGKey(0), (c, 384), jnp.float32)
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    q = keys[:256] + 0.01
    first, best = _timed(lambda: fn(q, keys, jnp.int32(c)))
    rows.append({"benchmark": "hopfield_retrieval", "shape": f"queries=256 keys={c} d=384",
                 "first_s": first, "steady_s": best, "throughput": f"{256 / best:,.0f} queries/s"})
  return rows


def bench_horse_edit(world, reference=False):
  """HORSE: cache keys/value gradients, predict shifts and solve for N world edits at once."""
  from horse_jax.editors import hypernet
  from horse_jax.eval import methods as methods_lib
  model, tok, records = world["model"], world["tokenizer"], world["records"]
  ctx = methods_lib.CellContext(model=model, tokenizer=tok, score=None, logits_fn=None,
                                generate_fn=None, model_path=world["model_path"], progress=False)
  cfg, state = methods_lib._hypernet_editor(hypernet, "horse", ctx, {"name": "horse", "hypernet": "init"}, 0)
  rows = []
  for n in (100, 1000):
    batches = hypernet.edit_batches(tok, records[:n], cfg.lm_batch)
    first, best = _timed(lambda: hypernet.edit(state, model, cfg, batches)[0], repeats=1)
    rows.append({"benchmark": "horse_edit", "shape": f"N={n} edits at once", "first_s": first,
                 "steady_s": best, "throughput": f"{n / best:,.0f} edits/s"})
  return rows


def bench_horen_edit(world, reference=False):
  """HoReN: sequential edits (n_iter Adam steps each, layers from the wrapped one upward)."""
  from horse_jax.eval import methods as methods_lib
  model, tok, records = world["model"], world["tokenizer"], world["records"]
  ctx = methods_lib.CellContext(model=model, tokenizer=tok, score=None, logits_fn=None,
                                generate_fn=None, model_path=world["model_path"], progress=False)
  method = methods_lib.SEQUENTIAL["horen"]
  state = method.start(ctx, {"name": "horen"}, 0)
  n_warm, n = 20, 100
  start = time.perf_counter()
  for record in records[:n_warm]:  # one call per edit: the per-request cost, as the reference pays it
    state = method.edit(ctx, state, [record])
  jax.block_until_ready(state[1])
  first = time.perf_counter() - start
  start = time.perf_counter()
  for record in records[n_warm:n_warm + n]:
    state = method.edit(ctx, state, [record])
  jax.block_until_ready(state[1])
  steady = time.perf_counter() - start
  return [{"benchmark": "horen_edit", "shape": f"{n} sequential edits (after {n_warm} warm-up)",
           "first_s": first, "steady_s": steady, "throughput": f"{n / steady:,.1f} edits/s"}]


def bench_horse_meta_step(world, reference=False):
  """HORSE meta-training step on train/world_horse.yaml (one compiled program; compile apart), its
  cache gathered from the memo of the training records as `horse-jax train` does by default."""
  from benchmarks import hypernet as hb
  return hb.bench_meta_step(_hypernet_setup(world))


def bench_horse_meta_step_recompute(world, reference=False):
  """The same step recomputing its cache every step, as the reference does (no memo)."""
  from benchmarks import hypernet as hb
  return hb.bench_meta_step(_hypernet_setup(world), memo=False)


def bench_horse_edit_1000(world, reference=False):
  """1,000 HORSE world edits at once (one compiled program; compile apart; FLOPs, share of peak)."""
  from benchmarks import hypernet as hb
  return hb.bench_edit(_hypernet_setup(world))


def _hypernet_setup(world):
  if "hypernet_setup" not in world:
    from benchmarks import hypernet as hb
    import os
    world["hypernet_setup"] = hb.world_setup(os.path.dirname(world["model_path"]))
  return world["hypernet_setup"]


def bench_horen_llama8(world, reference=False):
  """HoReN per edit on an 8-layer random Llama (hidden 64, vocab 2,048): steady state (edits
  201-400 of 400, block of 16 and the one-at-a-time path) and 10,000 edits with compilation."""
  from benchmarks import codebook as codebook_bench
  return codebook_bench.bench_llama8()


def bench_horen_llama8_targets(world, reference=False):
  """The same at 1, 3-12 (the world's ZsRE records under a Llama tokenizer) and 12 target tokens
  (block path; steady state and 10,000 edits with compilation), with the reference's ms per edit
  and the ratio where `benchmarks.codebook.REFERENCE_MS` has that shape."""
  from benchmarks import codebook as codebook_bench
  return codebook_bench.bench_llama8_targets()


def bench_horen_world_50k(world, reference=False):
  """HoReN over 50,000 distinct world edits in sequence, then ES/GS/locality of all of them
  (long: run it with --only; `python -m benchmarks.codebook --world-distinct N`
  runs other sizes)."""
  import os
  from benchmarks import codebook as codebook_bench
  return codebook_bench.bench_world_distinct(os.path.dirname(world["model_path"]), n=50_000)


def bench_horse_solve_meshes(world, reference=False):
  """HORSE's 1,000-edit world shifts on 1x1, 1x8 and 2x4 against each other and a float64 solve
  (needs 8 devices: JAX_NUM_CPU_DEVICES=8 on a CPU host; run it with --only)."""
  import os
  from benchmarks import solve
  return solve.bench_mesh_agreement(os.path.dirname(world["model_path"]))


def bench_horse_metagrad_meshes(world, reference=False):
  """HORSE meta-training on 1x1 and 2x4, cache recomputed or from the memo: first-step gradients,
  hypernetworks after 3 steps and their validation ES/GS/LS (needs 8 devices; run it with --only)."""
  import os
  from benchmarks import metagrad
  return metagrad.bench_metagrad_agreement(os.path.dirname(world["model_path"]))


def _reference_bench(method: str):
  def bench(world, reference=False):
    from benchmarks import reference as ref  # noqa: PLC0415
    opts = world.get("reference_options", {})
    return ref.rows(world, [method], opts.get("code_dir"), n_edits=opts.get("edits", 5),
                    steps=opts.get("steps"))
  bench.__doc__ = (f"{method}: ms per edit, ours vs the HoReN reference code on the same CPU and "
                   "model (needs --reference-code DIR)")
  return bench


# Benchmarks left out of a plain `horse-jax bench` (they take long): run them with --only.
ON_REQUEST = ("horen_world_50k", "horse_solve_meshes", "horse_metagrad_meshes")
# Ours against the reference code, one per method (`benchmarks.reference`); a plain
# `horse-jax bench` runs them only with --reference-code.
REFERENCE = tuple(f"reference_{m}" for m in ("ultraedit", "alphaedit", "memit", "rome", "wise",
                                            "defer", "grace", "horen"))

BENCHMARKS = {
    "forward": bench_forward,
    "generate": bench_generate,
    "ridge_solve": bench_ridge_solve,
    "hopfield": bench_hopfield,
    "horse_edit": bench_horse_edit,
    "horse_meta_step": bench_horse_meta_step,
    "horse_meta_step_recompute": bench_horse_meta_step_recompute,
    "horse_edit_1000": bench_horse_edit_1000,
    "horen_edit": bench_horen_edit,
    "horen_llama8": bench_horen_llama8,
    "horen_llama8_targets": bench_horen_llama8_targets,
    "horen_world_50k": bench_horen_world_50k,
    "horse_solve_meshes": bench_horse_solve_meshes,
    "horse_metagrad_meshes": bench_horse_metagrad_meshes,
    **{name: _reference_bench(name[len("reference_"):]) for name in REFERENCE},
}


def load_world(world_dir: str | None = None, n_records: int = 1000, *, mesh=None,
               fsdp: bool = False) -> dict[str, Any]:
  """The embedded world model, tokenizer and test records used by the benchmarks.

  Args:
    world_dir: the world folder (default: the embedded world's).
    n_records: test records to load.
    mesh: device mesh the model is sharded over (None: one device).
    fsdp: also split the weights over the mesh's data axis.

  Returns:
    {"model", "tokenizer", "model_path", "records"}.
  """
  import os
  from horse_jax.data.loaders import load_records
  from horse_jax.runtime import load_model
  from horse_jax.world.build import default_world_dir
  root = world_dir or default_world_dir()
  path = os.path.join(root, "model")
  model, tokenizer = load_model(path, mesh=mesh, fsdp=fsdp)
  return {"model": model, "tokenizer": tokenizer, "model_path": path,
          "records": load_records(os.path.join(root, "data", "zsre_test.json"), limit=n_records)}


def markdown(rows: list[dict[str, Any]], device: str) -> str:
  """Rows as markdown tables (seconds to 4 significant digits); the reference rows in their own."""
  own = [r for r in rows if not r["benchmark"].startswith("reference_")]
  lines = [f"Device: {device}", ""]
  if own:
    # Reference columns only when a row carries a reference figure (ms per edit of the PyTorch code).
    ref = any("reference_ms" in r for r in own)
    lines += ["| benchmark | shape | first call (s, incl. compile) | steady (s) | throughput |"
              + (" reference_ms | ratio |" if ref else ""),
              "|---|---|---|---|---|" + ("---|---|" if ref else "")]
    for r in own:
      extra = ""
      if ref:
        extra = (f" {r['reference_ms']:.4g} | {r['ratio']:.1f}x |" if "reference_ms" in r
                 else " | |")
      lines.append(f"| {r['benchmark']} | {r['shape']} | {r['first_s']:.4g} | {r['steady_s']:.4g} | "
                   f"{r['throughput']} |" + extra)
  refs = [r for r in rows if r["benchmark"].startswith("reference_")]
  if refs:
    from benchmarks import reference  # noqa: PLC0415
    lines += (["", "Ours against the reference code (same CPU, model and records, one after the "
               "other):", ""] if own else []) + [reference.markdown(refs).rstrip("\n")]
  return "\n".join(lines) + "\n"


def run(names, world_dir=None, reference=False, progress=True, *, mesh=None,
        fsdp: bool = False, reference_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Runs the named benchmarks on the world model.

  Args:
    names: keys of `BENCHMARKS`, in the order to run.
    world_dir: the world folder (default: the embedded world's).
    reference: also time reference-scale shapes (needs an accelerator).
    progress: show a progress bar.
    mesh, fsdp: how the world model is placed (`load_world`).
    reference_options: the `reference_*` benchmarks' {"code_dir": the reference checkout or None,
      "edits": edits timed per side, "steps": a reduced iteration count or None}.

  Returns:
    The benchmarks' rows (dicts with benchmark, shape, first_s, steady_s, throughput, ...).
  """
  from tqdm import tqdm
  world = load_world(world_dir, mesh=mesh, fsdp=fsdp)
  world["reference_options"] = dict(reference_options or {})
  rows: list[dict[str, Any]] = []
  try:
    for name in tqdm(names, desc="benchmarks", disable=not progress):
      rows += BENCHMARKS[name](world, reference)
  finally:
    if "reference_work" in world:  # the reference benchmarks' model and statistics
      import shutil  # noqa: PLC0415
      shutil.rmtree(world["reference_work"], ignore_errors=True)
  return rows


def device_description() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}, jax {jax.__version__}, " \
         f"numpy {np.__version__}"
