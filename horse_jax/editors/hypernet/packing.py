"""Host-side packing of LM mini-batches into fixed-shape arrays for the compiled edit/train programs.

Sequences are independent in a causal LM (attention never crosses rows, norms are per token), so the
mini-batches of the reference can be regrouped freely as long as every quantity keeps its value:

* Several sequences share one row of `width` tokens (first-fit decreasing); a block-diagonal causal
  mask (segment ids) and per-segment position ids make each one see exactly what it saw alone. This
  drops the right-padding of power-of-two length buckets (about a third of the tokens of the world
  recipe).
* The reference loss of a set is the sum over its mini-batches of the token-mean CE; per label token
  that is `nll / (label tokens of its mini-batch)`, so each label position carries that weight. Value
  gradients of a mini-batch's CE at a position of one of its sequences are unchanged by the
  regrouping.
* Cached rows (answer or attended positions) keep the reference order: mini-batch by mini-batch,
  row-major over [B, T] inside each, and remember their mini-batch for the normalizer updates.
* Only label positions reach the LM head (`label_index`), which is all the loss needs.
* The programs run the LM over the rows in n chunks of at most `LM_CHUNK_TOKENS` tokens
  (`lm_chunks`), so only one chunk's activations are alive. Chunk c holds the rows c, c + n,
  c + 2n, ... (strided, so a `data`-split of the rows splits every chunk); W is rounded up so that n
  divides it (`chunked_rows`, usually no change), and label entries are then laid out
  chunk by chunk ([n, L / n], reference order inside a chunk, padding pointing into its own chunk).
  Losses are sums over label positions, so their order does not matter; cached rows keep theirs.

Shapes are bucketed (`rows_bucket`) so that consecutive steps of a training run reuse one compiled
program; `Packer` keeps the largest bucket seen so far for the same purpose.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from horse_jax.data.tokenize import IGNORE, EditBatch, bucket_length


class Packed(NamedTuple):
  """One set of sequences (edits, rephrases or locality prompts) packed into rows.

  Attributes:
    input_ids: [W, P] int32 token ids (0 on padding).
    position_ids: [W, P] int32 positions, restarting at 0 for every segment.
    segment_ids: [W, P] int32, k >= 1 for the k-th sequence of a row, 0 on padding.
    label_index: [L] int32 flat indices into W * P of the positions with a label (padded with 0);
      chunk by chunk when the rows make several LM chunks (`lm_chunks`).
    label_ids: [L] int32 the labels there (0 on padding).
    label_weight: [L] float32 1 / (label tokens of the position's mini-batch); 0 on padding.
    rows: [R] int32 flat indices of the cached rows, in reference order (padded with 0).
    row_valid: [R] float32 1 on real cached rows.
    row_batch: [R] int32 mini-batch of each cached row (the number of mini-batches on padding).
    batch_rows: [n_batches] int32 cached rows per reference mini-batch (its length is static).
  """

  input_ids: np.ndarray
  position_ids: np.ndarray
  segment_ids: np.ndarray
  label_index: np.ndarray
  label_ids: np.ndarray
  label_weight: np.ndarray
  rows: np.ndarray
  row_valid: np.ndarray
  row_batch: np.ndarray
  batch_rows: np.ndarray


class Sequence_(NamedTuple):
  ids: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32 (IGNORE where no loss)
  use: np.ndarray  # [n] bool: cached positions (answer or attended, per `token`)
  batch: int  # mini-batch index


def token_mask(batch: EditBatch, token: str) -> np.ndarray:
  """[B, T] bool: the positions of a mini-batch whose keys / value grads are cached.

  Args:
    batch: a right-padded LM mini-batch.
    token: "ans" (positions with a label: the answer) or "all" (every attended position).
  """
  if token == "ans":
    return np.asarray(batch.labels) != IGNORE
  if token == "all":
    return np.asarray(batch.attention_mask) != 0
  raise ValueError(f"token must be 'ans' or 'all', not {token!r}")


def padded_rows(n_rows: int, chunk: int) -> tuple[int, int]:
  """(total rows, hypernetwork chunk) of n_rows cached rows: a power-of-two bucket below one chunk,
  else whole chunks of `chunk` rows."""
  if n_rows <= chunk:
    total = bucket_length(n_rows, minimum=8)
    return total, total
  return -(-n_rows // chunk) * chunk, chunk


def rows_bucket(n: int, multiple: int = 8) -> int:
  """n rounded up to a multiple of max(`multiple`, next_power_of_two(n) / 32): <= ~6% waste."""
  if n <= multiple:
    return multiple
  step = max(multiple, bucket_length(n, minimum=1) // 32)
  return -(-n // step) * step


# Tokens per LM chunk of the compiled programs: bounds the LM activations alive at once (and their
# backward) independently of the number of edits; the world recipe's 1,000 edits are a few chunks.
LM_CHUNK_TOKENS = 4096


def lm_chunks(n_rows: int, width: int) -> int:
  """Number of LM chunks the programs use for [n_rows, width] packed rows: the fewest chunks of at
  most `LM_CHUNK_TOKENS` tokens, when that number divides n_rows (else 1)."""
  n = -(-n_rows * width // LM_CHUNK_TOKENS)
  return n if n > 1 and n_rows % n == 0 else 1


def chunked_rows(n_rows: int, width: int, row_multiple: int) -> int:
  """n_rows (a multiple of `row_multiple`) rounded up so that its LM chunks divide it.

  Preferred: chunks of a multiple of `row_multiple` rows (a `data` split of the rows then splits
  every chunk evenly) within 1/8 more rows; else any size up to twice n_rows that the chunk count
  divides; else n_rows (the LM then runs as one chunk).
  """
  if -(-n_rows * width // LM_CHUNK_TOKENS) <= 1:
    return n_rows
  for w in range(n_rows, n_rows + n_rows // 8 + 1, row_multiple):
    n = lm_chunks(w, width)
    if n > 1 and (w // n) % row_multiple == 0:
      return w
  for w in range(n_rows, 2 * n_rows + 1, row_multiple):
    if lm_chunks(w, width) > 1:
      return w
  return n_rows


def chunk_labels(lab_idx, lab_ids, lab_w, width: int, n_chunks: int, min_labels: int,
                 row_multiple: int):
  """Label entries laid out [n_chunks, per chunk] (flattened), each chunk padded to one size.

  Padding entries point at offset 0 of the chunk's first row with weight 0.
  """
  chunk = (lab_idx // width) % n_chunks
  counts = np.bincount(chunk, minlength=n_chunks)
  per = rows_bucket(max(int(counts.max()), -(-min_labels // n_chunks)), row_multiple)
  idx = np.repeat(np.arange(n_chunks, dtype=np.int64) * width, per).reshape(n_chunks, per)
  ids = np.zeros((n_chunks, per), np.int32)
  wts = np.zeros((n_chunks, per), np.float32)
  for c in range(n_chunks):
    sel = chunk == c  # reference order inside the chunk
    k = int(counts[c])
    idx[c, :k], ids[c, :k], wts[c, :k] = lab_idx[sel], lab_ids[sel], lab_w[sel]
  return idx.reshape(-1).astype(np.int32), ids.reshape(-1), wts.reshape(-1)


def sequences_from_batches(batches: Sequence[EditBatch], token: str) -> list[Sequence_]:
  """The real (unpadded) sequences of right-padded mini-batches, in order.

  Args:
    batches: mini-batches as `data.edit_batches` makes them (rows fully masked are padding).
    token: "ans" (cached rows at label positions) or "all" (at attended positions).

  Returns:
    One entry per real sequence with its mini-batch index.
  """
  out = []
  for j, b in enumerate(batches):
    ids, mask, labels = (np.asarray(x) for x in (b.input_ids, b.attention_mask, b.labels))
    use = token_mask(b, token)
    for i in range(ids.shape[0]):
      n = int(mask[i].sum())
      if n == 0:
        continue
      if not mask[i, :n].all():
        raise ValueError("packing needs right-padded mini-batches")
      out.append(Sequence_(ids[i, :n].astype(np.int32), labels[i, :n].astype(np.int32), use[i, :n], j))
  return out


def pack_width(seqs: Sequence[Sequence_]) -> int:
  """Row width: twice the power-of-two bucket of the longest sequence, at least 32."""
  return max(32, 2 * bucket_length(max(len(s.ids) for s in seqs), minimum=8))


def pack(seqs: Sequence[Sequence_], width: int, n_batches: int, chunk: int,
         min_rows: int = 0, min_labels: int = 0, min_cache_rows: int = 0, row_multiple: int = 8,
         with_rows: bool = True) -> Packed:
  """Packs sequences into [W, width] rows (first-fit decreasing) with label and cache-row indices.

  Args:
    seqs: sequences (see `sequences_from_batches`), in reference order.
    width: tokens per row (>= the longest sequence).
    n_batches: number of reference mini-batches (label weights and normalizer groups).
    chunk: hypernetwork chunk: cached rows are padded as `padded_rows` does.
    min_rows, min_labels, min_cache_rows: lower bounds for the bucketed sizes (keep a compiled
      program's shapes across steps).
    row_multiple: W is a multiple of this (the `data` mesh axis must divide it).
    with_rows: build the cached-row indices (edits); rephrase/locality sets need only labels.

  Returns:
    The packed set.
  """
  lengths = np.array([len(s.ids) for s in seqs])
  if lengths.max() > width:
    raise ValueError(f"a sequence of {lengths.max()} tokens does not fit rows of {width}")
  # Best-fit decreasing: longest sequences first, each into the fullest row it still fits in
  # (rows kept in stacks by free room; lengths are small integers, so this is O(N * width)).
  order = np.argsort(-lengths, kind="stable")
  by_room: list[list[int]] = [[] for _ in range(width + 1)]
  room_of: list[int] = []
  place = np.zeros((len(seqs), 2), np.int64)  # (row, offset)
  for i in order:
    n = int(lengths[i])
    for room in range(n, width + 1):
      if by_room[room]:
        r = by_room[room].pop()
        break
    else:
      r, room = len(room_of), width
      room_of.append(width)
    place[i] = (r, width - room)
    room_of[r] = room - n
    by_room[room - n].append(r)
  n_rows = len(room_of)
  w = chunked_rows(rows_bucket(max(n_rows, min_rows), row_multiple), width, row_multiple)
  ids = np.zeros((w, width), np.int32)
  pos = np.zeros((w, width), np.int32)
  seg = np.zeros((w, width), np.int32)
  n_seg = np.zeros((w,), np.int32)
  counts = np.zeros((n_batches,), np.float64)
  for s in seqs:
    counts[s.batch] += np.sum(s.labels != IGNORE)
  lab_idx, lab_ids, lab_w, rows, row_batch = [], [], [], [], []
  for i, s in enumerate(seqs):  # reference order: mini-batch by mini-batch, row-major inside
    r, off = place[i]
    n = lengths[i]
    n_seg[r] += 1
    ids[r, off:off + n] = s.ids
    pos[r, off:off + n] = np.arange(n)
    seg[r, off:off + n] = n_seg[r]
    flat = r * width + off + np.arange(n)
    has = s.labels != IGNORE
    lab_idx.append(flat[has])
    lab_ids.append(s.labels[has])
    lab_w.append(np.full((int(has.sum()),), 1.0 / max(counts[s.batch], 1.0)))
    if with_rows:
      rows.append(flat[s.use])
      row_batch.append(np.full((int(s.use.sum()),), s.batch))
  lab_idx, lab_ids, lab_w = (np.concatenate(x) for x in (lab_idx, lab_ids, lab_w))
  n_chunks = lm_chunks(w, width)
  if n_chunks > 1:
    lab_idx, lab_ids, lab_w = chunk_labels(lab_idx, lab_ids, lab_w, width, n_chunks, min_labels,
                                           row_multiple)
  n_lab = len(lab_idx) if n_chunks > 1 else rows_bucket(max(len(lab_idx), min_labels), row_multiple)

  def padded(x, size, dtype, value=0):
    out = np.full((size,), value, dtype)
    out[:len(x)] = x
    return out

  if with_rows:
    rows_a, batch_a = np.concatenate(rows), np.concatenate(row_batch)
    total, _ = padded_rows(max(len(rows_a), min_cache_rows), chunk)
  else:
    rows_a, batch_a, total = np.zeros((0,), np.int32), np.zeros((0,), np.int32), row_multiple
  return Packed(ids, pos, seg, padded(lab_idx, n_lab, np.int32), padded(lab_ids, n_lab, np.int32),
                padded(lab_w, n_lab, np.float32), padded(rows_a, total, np.int32),
                padded(np.ones(len(rows_a)), total, np.float32),
                padded(batch_a, total, np.int32, value=n_batches),
                np.bincount(batch_a, minlength=n_batches).astype(np.int32))


class Packer:
  """Packs the three sets of each step with shapes that only grow (one compile for a whole run).

  Attributes:
    sizes: per set name, the largest (rows, labels, cache rows) used so far.
  """

  def __init__(self, chunk: int, row_multiple: int = 8):
    self.chunk = chunk
    self.row_multiple = row_multiple
    self.sizes: dict[str, tuple[int, int, int]] = {}
    self.width = 0

  def __call__(self, name: str, batches: Sequence[EditBatch], token: str, with_rows: bool) -> Packed:
    seqs = sequences_from_batches(batches, token)
    self.width = max(self.width, pack_width(seqs))
    lo = self.sizes.get(name, (0, 0, 0))
    p = pack(seqs, self.width, len(batches), self.chunk, *lo, row_multiple=self.row_multiple,
             with_rows=with_rows)
    self.sizes[name] = (p.input_ids.shape[0], p.label_index.shape[0], p.rows.shape[0])
    return p
