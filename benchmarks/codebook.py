"""Sequential-editing benchmark and demo on a tiny random llama (CPU-friendly).

  python -m benchmarks.codebook --edits 10000 --n-iter 50
  python -m benchmarks.codebook --demo --edits 200

Benchmark: applies N distinct random edits one after another (each adds a key, so the codebook
doubles log2(N) times) and prints, at every capacity change and at the end: edits done, capacity,
compiled edit programs, codebook bytes, process RSS and edits/second. The point: the compile count
equals the number of capacity buckets (not the number of edits) and memory grows only with the
codebook.

Demo (--demo): after the edits, scores every edit on the final model (teacher-forced token accuracy,
as MALMEN's succ_ratios: per edit, the share of answer positions whose argmax is the label) and checks unrelated prompts keep their pre-edit greedy predictions at every
target position (locality agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors.codebook import edit, infer, state
from horse_jax import settings as settings_lib
from horse_jax.editors.codebook.settings import CodebookSettings, from_resolved
from benchmarks.machine import cpu_peak_flops, peak_rss_mb, rss_mb
from horse_jax.models import apply
from horse_jax.models import names
from horse_jax.models.init import random_model, tiny_llama_config


def random_edits(n: int, vocab: int, t: int, seed: int, max_target: int = 2) -> EditBatch:
  """n random (prompt, target) token edits, right-padded to t (one length bucket)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, t), np.int32)
  mask = np.zeros((n, t), np.int32)
  labels = np.full((n, t), IGNORE, np.int32)
  plen = np.zeros((n,), np.int32)
  for i in range(n):
    p = rng.integers(4, t - max_target)
    y = rng.integers(4, vocab, rng.integers(1, max_target + 1))
    prompt = np.concatenate([[1], rng.integers(4, vocab, p - 1)])  # BOS = 1
    seq = np.concatenate([prompt, y[:-1]])
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    labels[i, p - 1:p - 1 + len(y)] = y
    plen[i] = p
  return EditBatch(ids, mask, labels, plen)


def run_bench(model, batch: EditBatch, settings: CodebookSettings, progress: bool = True):
  """Applies every row as one edit; returns (codebook, per-checkpoint rows, seconds)."""
  book = state.init(settings, model.config.intermediate_size, model.config.hidden_size)
  compiles0 = edit.compile_count()
  rows, cap = [], book.capacity
  t0 = last_t = time.time()
  last_i = 0
  n = batch.input_ids.shape[0]
  for i in tqdm(range(n), desc="edits", disable=not progress, mininterval=2.0):
    book, _ = edit.apply_edit(model, book, batch, i, settings)
    if book.capacity != cap or i == n - 1:
      jax.block_until_ready(book)
      cap, now = book.capacity, time.time()
      # Rate since the previous row: it includes one compilation (the new bucket's) at most.
      rows.append(dict(edits=i + 1, capacity=cap, keys=int(book.count),
                       compiles=edit.compile_count() - compiles0,
                       codebook_mb=book.nbytes() / 2**20, rss_mb=rss_mb(),
                       edits_per_s=(i + 1 - last_i) / (now - last_t)))
      last_i, last_t = i + 1, now
  jax.block_until_ready(book)
  return book, rows, time.time() - t0


def llama8_model(seed: int = 0):
  """The speed benchmark's model: random Llama, 8 layers, hidden 64, MLP 176, GQA 4/2 heads,
  vocab 2,048, float32."""
  cfg = tiny_llama_config(vocab_size=2048, hidden_size=64, intermediate_size=176, num_layers=8,
                          num_heads=4, num_kv_heads=2, head_dim=16)
  return random_model(cfg, seed=seed)


def zsre_like_edits(n: int, vocab: int, seed: int, t: int = 24,
                    targets: tuple[int, int] = (1, 3)) -> EditBatch:
  """n ZsRE-shaped random edits: BOS + 9-19 prompt tokens, a target of `targets` = (fewest, most)
  tokens (uniform), padded to t (at least 20 + most - 1)."""
  lo, hi = targets
  t = max(t, 20 + hi - 1)
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, t), np.int32)
  mask = np.zeros((n, t), np.int32)
  labels = np.full((n, t), IGNORE, np.int32)
  plen = np.zeros((n,), np.int32)
  for i in range(n):
    p = int(rng.integers(10, 21))
    y = rng.integers(4, vocab, rng.integers(lo, hi + 1))
    seq = np.concatenate([[1], rng.integers(4, vocab, p - 1), y[:-1]])
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    labels[i, p - 1:p - 1 + len(y)] = y
    plen[i] = p
  return EditBatch(ids, mask, labels, plen)


def block_flops(model, book, batch: EditBatch, settings: CodebookSettings, block: int,
                rows=None, shape: tuple[int, int | None] | None = None) -> float:
  """FLOPs of one block program (XLA cost analysis). The analysis counts a loop body once, so the
  program is compiled with n_iter 1 and with n_iter 2 unrolled: total = f1 + (n_iter - 1)(f2 - f1)
  (one wave, the case without shared rows).

  Args:
    rows: the edits of the timed `apply_edits` call (default all): the program's window shape is
      theirs (`edit.window_shape`).
    shape: instead, this (n_label, n_tokens).
  """
  from horse_jax.editors.codebook.settings import hyper_of, jit_key
  sl = slice(0, block)
  labels = np.asarray(batch.labels[sl])
  rows = np.arange(batch.labels.shape[0]) if rows is None else np.asarray(list(rows))
  n_label, n_tokens = shape or edit.window_shape(np.asarray(batch.labels)[rows],
                                                 np.asarray(batch.prompt_len)[rows], block)

  def flops(n_iter):
    with_iter = dataclasses.replace(settings, n_iter=n_iter)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), book)
    compiled = edit._edit_block_jit.lower(
        model, shapes, batch.input_ids[sl], batch.attention_mask[sl], labels,
        batch.prompt_len[sl], np.zeros((block, 2), np.int32), np.ones((block,), bool),
        hyper_of(with_iter), settings=jit_key(with_iter),
        n_label=n_label, n_tokens=n_tokens, mesh=None, unroll=n_iter).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))

  f1, f2 = flops(1), flops(2)
  return f1 + (settings.n_iter - 1) * (f2 - f1)


# PyTorch reference HoReN (github ha11ucin8/HoReN, its editor on CPU, torch float32) per edit on
# `llama8_model` saved in Hugging Face format, by target tokens (fewest, most): see
# docs/performance.md for the command and the box's load when each was timed.
REFERENCE_MS = {(1, 3): 400.0}


def reference_figure(targets: tuple[int, int]) -> float | None:
  """The default `reference_ms` hook of `bench_llama8`: a figure of `REFERENCE_MS`, or None."""
  return REFERENCE_MS.get(tuple(targets))


def bench_llama8(n_steady: int = 400, n_long: int = 10000, block: int = edit.DEFAULT_BLOCK,
                 progress: bool = False, targets: tuple[int, int] = (1, 3),
                 reference_ms: Callable[[tuple[int, int]], float | None] | None = reference_figure,
                 one_at_a_time: bool = True) -> list[dict]:
  """HoReN speed on `llama8_model` (wrapped model.layers.6.mlp.down_proj, 50 Adam steps, cold
  values, threshold 0.85, default query strategy), ZsRE-shaped edits with `targets` = (fewest,
  most) target tokens.

  Rows: steady state (edits n/2+1..n of an n-edit run, compilation excluded; block `block` and,
  with `one_at_a_time`, the one-at-a-time reference path, block 1), and an n_long-edit run timed
  whole (compilation included). Compile time = first block's time minus a steady block's. FLOPs
  from XLA's cost analysis (`block_flops`), share of `cpu_peak_flops`. The load average is reported
  because the CPU may be shared.

  Args:
    reference_ms: optional fn(targets) -> the reference's ms per edit for that shape, or None; rows
      then carry `reference_ms` and `ratio` (reference time / ours). Default: `REFERENCE_MS`.
  """
  name = "horen_llama8" if tuple(targets) == (1, 3) else f"horen_llama8_t{targets[0]}-{targets[1]}"
  ref = reference_ms(tuple(targets)) if reference_ms is not None else None
  tgt = f"targets {targets[0]}-{targets[1]} tokens" if targets[0] != targets[1] else \
      f"targets {targets[0]} token{'s' if targets[0] > 1 else ''}"

  def versus(row, per_edit_s):
    if ref is not None:
      row.update(reference_ms=ref, ratio=ref / (per_edit_s * 1e3))
      row["throughput"] += f"; reference {ref:,.0f} ms/edit: {row['ratio']:,.0f}x"
    return row

  model = llama8_model()
  settings = CodebookSettings(layer="model.layers.6.mlp.down_proj", n_iter=50,
                              hopfield_key_match_threshold=0.85)
  d_in, d_out = model.config.intermediate_size, model.config.hidden_size
  peak = cpu_peak_flops()
  rows = []
  batch = zsre_like_edits(max(n_steady, n_long), model.config.vocab_size, seed=1, targets=targets)
  for blk in (block, 1) if one_at_a_time else (block,):
    book = state.init(settings, d_in, d_out)
    book = state.ensure_room(book, n_steady, count=1)  # the run's size is known: one capacity
    half = n_steady // 2
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    book, _ = edit.apply_edits(model, book, batch, settings, rows=range(blk), block=blk,
                               progress=False)
    jax.block_until_ready(book)
    first = time.perf_counter() - t0
    book, _ = edit.apply_edits(model, book, batch, settings, rows=range(blk, half), block=blk,
                               progress=False)
    jax.block_until_ready(book)
    t1 = time.perf_counter()
    book, infos = edit.apply_edits(model, book, batch, settings, rows=range(half, n_steady),
                                   block=blk, progress=False)
    jax.block_until_ready(book)
    per_edit = (time.perf_counter() - t1) / (n_steady - half)
    flops = block_flops(model, book, batch, settings, blk, rows=range(half, n_steady)) / blk
    rows.append(versus({
        "benchmark": name, "shape": f"{tgt}, edits {half + 1}-{n_steady} of {n_steady}, "
                                    f"block {blk}{' (reference path)' if blk == 1 else ''}",
        "first_s": first, "compile_s": max(first - blk * per_edit, 0.0), "steady_s": per_edit,
        "flops": flops, "gflops_per_s": flops / per_edit / 1e9,
        "peak_share": flops / per_edit / peak, "load": load,
        "edit_acc": float(np.mean([x["edit_acc"] for x in infos])),
        "throughput": f"{per_edit * 1e3:.1f} ms/edit, {flops / 1e6:,.0f} MFLOP/edit = "
                      f"{flops / per_edit / 1e9:.1f} GFLOP/s, {100 * flops / per_edit / peak:.1f}% "
                      f"of {peak / 1e9:,.0f} GFLOP/s peak; load {load:.1f}"}, per_edit))
  if n_long:
    book = state.init(settings, d_in, d_out)
    compiles0 = edit.compile_count()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    book, infos = edit.apply_edits(model, book, batch, settings, rows=range(n_long), block=block,
                                   progress=progress)
    jax.block_until_ready(book)
    total = time.perf_counter() - t0
    compiles = edit.compile_count() - compiles0
    rows.append(versus({
        "benchmark": name, "shape": f"{tgt}, {n_long} edits, block {block}, compilation included",
        "first_s": total, "steady_s": total / n_long, "compiles": compiles, "load": load,
        "capacity": book.capacity, "edit_acc": float(np.mean([x["edit_acc"] for x in infos])),
        "throughput": f"{total / n_long * 1e3:.1f} ms/edit incl. {compiles} compile(s) "
                      f"(capacity {book.capacity}); load {load:.1f}"}, total / n_long))
  return rows


# Target lengths of `bench_llama8_targets`: one token, the world's ZsRE records under a Llama
# tokenizer (~6 tokens, 3-12), and twelve.
TARGET_SHAPES = ((1, 1), (3, 12), (12, 12))


def bench_llama8_targets(shapes=TARGET_SHAPES, n_long: int = 10000, **kw) -> list[dict]:
  """`bench_llama8` at several target lengths (block path only; `horen_llama8` has the 1-3 token
  shape and the one-at-a-time path)."""
  return [r for targets in shapes
          for r in bench_llama8(n_long=n_long, targets=targets, one_at_a_time=False, **kw)]


def world_settings(model_path: str, model) -> CodebookSettings:
  """HoReN settings from the model's card (its `horen.editor` section: layer, threshold, ...)."""
  return from_resolved(settings_lib.resolve_for_model("horen", model_path, model.config), model.config)


def bench_world_distinct(world_dir: str | None = None, n: int = 50_000,
                         block: int | None = None, progress: bool = True,
                         batch_size: int = 256) -> list[dict]:
  """HoReN over `n` distinct world edit requests in sequence (`generator.distinct_edits`), with the
  world card's settings, then ES / GS / locality of all of them on the final model.

  Returns one row: edit seconds (compilation included), edits/s, compiled programs, codebook rows
  and bytes, peak RSS, and the summary scores (teacher-forced, `eval.scoring`).
  """
  from horse_jax.data.loaders import convert_rows
  from horse_jax.data.tokenize import tokenize_edits
  from horse_jax.eval.scoring import score_records, teacher_forced_batches
  from horse_jax.models import apply, from_pretrained, load_tokenizer
  from horse_jax.world import generator
  from horse_jax.world.build import default_world_dir, load_world
  root = world_dir or default_world_dir()
  path = os.path.join(root, "model")
  world = load_world(root)
  rows = [generator.to_zsre(e) for e in generator.distinct_edits(world, n)]
  records, _ = convert_rows(rows, fmt="zsre")
  model, tok = from_pretrained(path), load_tokenizer(path)
  settings = world_settings(path, model)
  block = settings.edit_block if block is None else int(block)  # default: the card's editor.edit_block
  batch = tokenize_edits(tok, [r.prompt for r in records], [r.target for r in records],
                         max_length=model.config.max_position_embeddings)
  d_in, d_out = (int(x) for x in names.get_kernel(model.params, settings.layer).shape)
  book = state.init(settings, d_in, d_out)
  compiles0 = edit.compile_count()
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  book, infos = edit.apply_edits(model, book, batch, settings, block=block, progress=progress)
  jax.block_until_ready(book)
  edit_s = time.perf_counter() - t0
  compiles = edit.compile_count() - compiles0
  pre = jax.jit(apply)
  t1 = time.perf_counter()
  scores = score_records(records, tok, infer.logits_fn(model, book, settings),
                         lambda b: pre(model, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)),
                         batch_size=batch_size, progress=progress,
                         max_length=model.config.max_position_embeddings)
  score_s = time.perf_counter() - t1
  s = scores["summary"]
  keys = int(book.count)
  shapes = teacher_forced_batches(records, tok, batch_size=batch_size,
                                  max_length=model.config.max_position_embeddings)
  flops = scoring_flops(model, book, settings, shapes, batch_size)
  floor_s = flops / cpu_peak_flops()
  return [{
      "benchmark": "horen_world_distinct", "shape": f"{n} distinct world edits, block {block}",
      "first_s": edit_s, "steady_s": edit_s / n, "edit_s": edit_s, "edits_per_s": n / edit_s,
      "compiles": compiles, "codebook_rows": keys, "capacity": book.capacity,
      "codebook_mb": book.nbytes() / 2**20, "peak_rss_mb": peak_rss_mb(), "load": load,
      "score_s": score_s, "scored_records_per_s": n / score_s, "score_batches": sum(shapes.values()),
      "score_gflop": flops / 1e9, "score_floor_s": floor_s, "score_floor_share": floor_s / score_s,
      "settings": settings.to_editor_dict(),
      "immediate_edit_acc": float(np.mean([x["edit_acc"] for x in infos])),
      "summary": s,
      "throughput": f"{n / edit_s:,.1f} edits/s ({compiles} compile(s), {keys} keys, "
                    f"{book.nbytes() / 2**20:,.0f} MiB codebook, peak RSS {peak_rss_mb():,.0f} MiB); "
                    f"ES {s.get('edit_acc')} GS {s.get('rephrase_acc')} loc_acc {s.get('loc_acc')} "
                    f"loc_agree {s.get('loc_agree')}; scoring {score_s:,.0f} s = {n / score_s:,.0f} "
                    f"records/s, {sum(shapes.values())} batches of {flops / 1e9:,.0f} GFLOP in all: "
                    f"{floor_s:,.0f} s at the nominal peak ({floor_s / score_s:.0%} of it); "
                    f"load {load:.1f}"}]


def scoring_flops(model, book, settings: CodebookSettings, shapes: dict[int, int],
                  batch_size: int) -> float:
  """FLOPs of a teacher-forced scoring pass (XLA cost analysis): per batch shape, the edited
  model's logits program, the unedited model's and the metric kernel, times the batches of that
  shape (`scoring.teacher_forced_batches`). The retrieval's Hopfield loop runs its body once at
  the card's max_iter 1, as the analysis counts it."""
  from horse_jax.editors.codebook.settings import hyper_of, jit_key
  from horse_jax.eval.scoring import _tf_scores_both

  def cost(compiled):
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float((c or {}).get("flops", 0.0))

  book_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       state.fitted(book))  # the rows `infer.logits_fn` reads
  v = model.config.vocab_size
  total = 0.0
  for length, n_batches in shapes.items():
    ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    plen = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    logits = jax.ShapeDtypeStruct((batch_size, length, v), jnp.float32)
    post = infer._edited_logits.lower(model, book_shapes, ids, ids, plen, hyper_of(settings),
                                      settings=jit_key(settings), mesh=None).compile()
    pre = jax.jit(apply).lower(model, ids, ids).compile()
    kernel = _tf_scores_both.lower(logits, logits, ids).compile()
    total += n_batches * (cost(post) + cost(pre) + cost(kernel))
  return total


def demo_scores(model, book, settings, batch: EditBatch, unrelated: EditBatch, chunk: int = 64):
  """(edit accuracy on the final model, locality agreement of unrelated prompts, matched share)."""
  def logits(b, edited):
    out = []
    for s in range(0, b.input_ids.shape[0], chunk):
      ids = jnp.asarray(b.input_ids[s:s + chunk])
      mask = jnp.asarray(b.attention_mask[s:s + chunk])
      if edited:
        out.append(np.asarray(infer.edited_logits(model, book, ids, mask,
                                                  jnp.asarray(b.prompt_len[s:s + chunk]),
                                                  settings=settings)))
      else:
        out.append(np.asarray(jax.jit(apply)(model, ids, mask)))
    return np.concatenate(out)

  valid = batch.labels != IGNORE
  hit = (logits(batch, True).argmax(-1) == batch.labels) & valid
  edit_acc = float(np.mean(hit.sum(1) / valid.sum(1)))
  uvalid = unrelated.labels != IGNORE
  agree = (logits(unrelated, True).argmax(-1) == logits(unrelated, False).argmax(-1)) & uvalid
  loc_agree = float(np.mean(agree.sum(1) / uvalid.sum(1)))
  return edit_acc, loc_agree


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--edits", type=int, default=10000)
  parser.add_argument("--n-iter", type=int, default=settings_lib.default("editor.n_iter", "horen"))
  parser.add_argument("--layer", type=int, default=1, help="wrapped down_proj layer (of 4)")
  parser.add_argument("--threshold", type=float, default=0.8,
                      help="match threshold (tiny random models have anisotropic queries)")
  parser.add_argument("--capacity", type=int, default=64, help="initial codebook rows")
  parser.add_argument("--seq", type=int, default=16, help="padded edit length")
  parser.add_argument("--method", choices=("horen", "grace"), default="horen")
  parser.add_argument("--demo", action="store_true", help="also score edits and locality")
  parser.add_argument("--world-distinct", type=int, default=0, metavar="N",
                      help="instead: HoReN over N distinct world edits (world card settings), "
                           "then ES/GS/locality of all of them")
  parser.add_argument("--llama8", action="store_true",
                      help="instead: the 8-layer speed case (steady state at 400 edits, and "
                           "--edits edits with compilation included)")
  parser.add_argument("--targets", default="1-3", metavar="LO-HI",
                      help="with --llama8: target tokens per edit, uniform in [LO, HI]")
  parser.add_argument("--block", type=int, default=None,
                      help="edits per program [editor.edit_block: the world card's, else 16]")
  parser.add_argument("--unrelated", type=int, default=200)
  parser.add_argument("--max-target", type=int, default=1,
                      help="target tokens per edit (1..N); only y[p] changes, and in a random "
                           "tiny model later target tokens barely feel it through attention")
  args = parser.parse_args(argv)
  if args.world_distinct or args.llama8:
    import json
    lo, _, hi = args.targets.partition("-")
    rows = (bench_world_distinct(n=args.world_distinct, block=args.block) if args.world_distinct
            else bench_llama8(n_long=args.edits, block=args.block or edit.DEFAULT_BLOCK,
                              targets=(int(lo), int(hi or lo))))
    for r in rows:
      print(json.dumps(r))
    return 0

  cfg = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4)
  model = random_model(cfg, seed=0)
  # The method's declared defaults (horse_jax.settings: GRACE's differ from HoReN's), then the flags.
  resolved = settings_lib.resolve(args.method, overrides=[
      f"editor.layer=model.layers.{args.layer}.mlp.down_proj", f"editor.n_iter={args.n_iter}",
      f"editor.hopfield_key_match_threshold={args.threshold}", f"editor.initial_capacity={args.capacity}"])
  settings = from_resolved(resolved, cfg)
  batch = random_edits(args.edits, cfg.vocab_size, args.seq, seed=1, max_target=args.max_target)
  print(f"{jax.devices()[0].platform}: {args.method}, {args.edits} edits, n_iter {args.n_iter}, "
        f"tiny llama (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}), "
        f"wrapped {settings.layer}, rss at start {rss_mb():.0f} MiB")
  book, rows, seconds = run_bench(model, batch, settings)
  print(f"{'edits':>7} {'capacity':>8} {'keys':>7} {'compiles':>8} {'codebook MiB':>12} "
        f"{'RSS MiB':>8} {'edits/s since previous row':>27}")
  for r in rows:
    print(f"{r['edits']:>7} {r['capacity']:>8} {r['keys']:>7} {r['compiles']:>8} "
          f"{r['codebook_mb']:>12.2f} {r['rss_mb']:>8.0f} {r['edits_per_s']:>27.1f}")
  print(f"total {seconds:.1f} s, {args.edits / seconds:.1f} edits/s (compile time included)")
  if args.demo:
    unrelated = random_edits(args.unrelated, cfg.vocab_size, args.seq, seed=2,
                             max_target=args.max_target)
    edit_acc, loc_agree = demo_scores(model, book, settings, batch, unrelated)
    print(f"final model: edit accuracy {edit_acc:.3f} over {args.edits} edits; unrelated prompts "
          f"keep their pre-edit predictions on {loc_agree:.3f} of target positions")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
