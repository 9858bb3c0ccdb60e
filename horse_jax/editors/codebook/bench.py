"""Sequential-editing benchmark and demo on a tiny random llama (CPU-friendly).

  python -m horse_jax.editors.codebook.bench --edits 10000 --n-iter 50
  python -m horse_jax.editors.codebook.bench --demo --edits 200

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
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors.codebook import edit, infer, state
from horse_jax import settings as settings_lib
from horse_jax.editors.codebook.settings import CodebookSettings, from_resolved
from horse_jax.models import apply
from horse_jax.models.init import random_model, tiny_llama_config


def rss_mb() -> float:
  """Resident set size of this process (MiB), from /proc (0 where unavailable)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


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
  parser.add_argument("--unrelated", type=int, default=200)
  parser.add_argument("--max-target", type=int, default=1,
                      help="target tokens per edit (1..N); only y[p] changes, and in a random "
                           "tiny model later target tokens barely feel it through attention")
  args = parser.parse_args(argv)

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
