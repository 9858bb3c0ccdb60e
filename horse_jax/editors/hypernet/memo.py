"""Memo of the unedited model's keys and value gradients of the training records (meta-training).

Every meta-training step caches the keys (inputs of the edited modules) and value gradients (d of
the edit CE w.r.t. their outputs) of its N edit records under the *unedited* model, which never
changes during meta-training. Records come back every few steps (2,500 records and 1,000 per step
in the world recipe), so a record's rows are computed once (`build`) and each step gathers them
(`program.train_program_memo`) instead of running the LM over the edit set again.

Only two things of a step's cache depend on the step rather than on the record:

* the order of the rows (mini-batch by mini-batch, longest edit first, as the reference batches
  them): `step_rows` lists the memo slots in that order;
* the mini-batch's label weight (the reference's loss is the token mean of each mini-batch, so a
  row's value gradient is 1 / label tokens of its mini-batch times the gradient of the plain sum
  over its own sequence): the memo stores gradients of unit weights and `step_rows` gives the
  weight of each row.

The memo is kept only when it fits `editor.memo_cache_mb` (per device: it is replicated); above
that every step recomputes the cache, as the reference does.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from horse_jax.data.tokenize import IGNORE
from horse_jax.editors.hypernet import packing, program
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.data import edit_batches, length_order
from horse_jax.editors.hypernet.packing import padded_rows


class MemoRows(NamedTuple):
  """The cached rows of one step, read from the memo.

  Attributes:
    slots: [R] int32 memo row of each cached row, reference order (padding: the spare slot).
    weight: [R] float32 label weight of the row's mini-batch (0 on padding).
    valid: [R] float32 1 on real rows.
    row_batch: [R] int32 mini-batch of each row (the number of mini-batches on padding).
    batch_rows: [n_batches] int32 rows per mini-batch.
  """

  slots: np.ndarray
  weight: np.ndarray
  valid: np.ndarray
  row_batch: np.ndarray
  batch_rows: np.ndarray


class CacheMemo:
  """Memoized keys / value grads of every training record, on device, and their host index.

  Attributes:
    arrays: (keys {name: [S + 1, d_k]}, grads {name: [S + 1, d_v]}) float32; row S is spare
      (padding rows point at it).
    offsets: [n_records + 1] first memo row of each record (its cached rows follow in order).
    rows: the largest padded row count of a step so far (steps reuse one compiled program).
  """

  def __init__(self, arrays, offsets: np.ndarray):
    self.arrays = arrays
    self.offsets = offsets
    self.rows = 0

  @property
  def n_slots(self) -> int:
    return int(self.offsets[-1])


def row_bytes(cfg: HypernetConfig) -> int:
  """Bytes of one memoized row (keys and value grads of every edited module, float32)."""
  return 4 * sum(k + v for k, v in cfg.shapes)


def _sequence_stats(batches) -> tuple[list[int], list[int], list[int]]:
  """(cached rows, label tokens, mini-batch) per real sequence of `batches`, in order."""
  seqs = packing.sequences_from_batches(batches, "all")  # token only decides `use`; see callers
  return ([len(s.ids) for s in seqs], [int(np.sum(s.labels != IGNORE)) for s in seqs],
          [s.batch for s in seqs])


def _uses(cfg: HypernetConfig, lengths: list[int], labels: list[int]) -> np.ndarray:
  return np.asarray(labels if cfg.token == "ans" else lengths, np.int64)


def edit_order(tokenizer, records, lm_batch: int, max_length: int | None):
  """(edit mini-batches, position in `records` of each of their real sequences, in order)."""
  batches = edit_batches(tokenizer, records, lm_batch, max_length)
  order = length_order(tokenizer, [r.prompt for r in records], [r.target for r in records])
  return batches, np.asarray(order, np.int64)


def rows_needed(tokenizer, records: Sequence, cfg: HypernetConfig,
                max_length: int | None = None) -> int:
  """Memo rows of `records`: their answer tokens (`editor.token` ans) or attended tokens (all)."""
  batches, _ = edit_order(tokenizer, records, cfg.lm_batch, max_length)
  lengths, labels, _ = _sequence_stats(batches)
  return int(_uses(cfg, lengths, labels).sum())


def budget_rows(cfg: HypernetConfig, budget_mb: float) -> int:
  """The most record rows a memo of at most `budget_mb` MiB holds (besides its spare row)."""
  return int(budget_mb * 2 ** 20 // row_bytes(cfg)) - 1


def plan(tokenizer, records: Sequence, cfg: HypernetConfig, budget_mb: float,
         max_length: int | None = None) -> tuple[bool, float]:
  """(whether the memo of `records` fits `budget_mb` MiB, its size in MiB).

  A lower bound (one row per record) is checked first, so a dataset far too large for the budget is
  refused without tokenizing it.
  """
  mib = lambda rows: (rows + 1) * row_bytes(cfg) / 2 ** 20
  limit = budget_rows(cfg, budget_mb)
  if budget_mb <= 0 or len(records) > limit:
    return False, mib(len(records))
  rows = rows_needed(tokenizer, records, cfg, max_length)
  return rows <= limit, mib(rows)


# Records per `program.fill_memo_program` call of `build` (bounds the LM pass of one call).
FILL_RECORDS = 1000


def build(model, tokenizer, records: Sequence, cfg: HypernetConfig, max_length: int | None = None,
          mesh=None, per_call: int = FILL_RECORDS, progress: bool = False) -> CacheMemo:
  """Computes the memo of every record (unit label weights), `per_call` records per program call.

  Args:
    model: the unedited LM.
    tokenizer: its tokenizer (a `data.MemoTokenizer` shares the tokenizations with training).
    records: the training records (memo row i belongs to records[i]).
    cfg: editor config.
    max_length: `data.max_length`.
    mesh: (`data`, `model`) Mesh or None: the memo is replicated over it.
    per_call: records per fill call.
    progress: show a progress bar.

  Returns:
    The filled CacheMemo.
  """
  parts = []
  for start in range(0, len(records), per_call):
    chunk = records[start:start + per_call]
    batches, order = edit_order(tokenizer, chunk, cfg.lm_batch, max_length)
    lengths, labels, _ = _sequence_stats(batches)
    uses = np.zeros(len(chunk), np.int64)
    uses[order] = _uses(cfg, lengths, labels)
    parts.append((start, batches, order, uses))
  counts = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  n_slots = int(offsets[-1])
  replicated = (None if mesh is None else
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  # made by a program with a declared output sharding, so it is a global array on any mesh
  zeros = jax.jit(lambda: ({m: jnp.zeros((n_slots + 1, k), jnp.float32)
                            for m, (k, _) in zip(cfg.modules, cfg.shapes)},
                           {m: jnp.zeros((n_slots + 1, v), jnp.float32)
                            for m, (_, v) in zip(cfg.modules, cfg.shapes)}),
                  out_shardings=replicated)
  arrays = zeros()
  packer = packing.Packer(cfg.chunk, 8 if mesh is None else max(8, mesh.shape["data"]))
  for start, batches, order, uses in tqdm(parts, desc="memo keys/grads", disable=not progress):
    packed = packer("memo", batches, cfg.token, True)
    packed = packed._replace(label_weight=(packed.label_weight > 0).astype(np.float32))
    slots = np.full(packed.rows.shape[0], n_slots, np.int32)
    seq_slots = [offsets[start + i] + np.arange(uses[i]) for i in order]
    real = np.concatenate(seq_slots) if seq_slots else np.zeros(0, np.int64)
    slots[:len(real)] = real
    arrays = program.fill_memo_program(arrays, model, program.put(packed, mesh),
                                       program.put_array(slots, mesh), cfg, mesh)
  return CacheMemo(arrays, offsets)


def step_rows(memo: CacheMemo, tokenizer, indices: np.ndarray, records: Sequence,
              cfg: HypernetConfig, max_length: int | None = None,
              batches: Sequence | None = None) -> MemoRows:
  """The memo rows of one step's edit set, in the order and with the weights of its cache.

  Args:
    memo: the CacheMemo of the training records.
    tokenizer: the tokenizer `build` used.
    indices: [N] indices into the training records of this step's records.
    records: the step's records (records[i] is training record indices[i]).
    cfg: editor config; max_length: `data.max_length`.
    batches: the step's edit mini-batches when already made (`data.edit_batches` of `records`);
      made here otherwise.

  Returns:
    MemoRows padded as the packed edit set would be (shapes only grow across steps).
  """
  if batches is None:
    batches, order = edit_order(tokenizer, records, cfg.lm_batch, max_length)
  else:
    order = np.asarray(length_order(tokenizer, [r.prompt for r in records],
                                    [r.target for r in records]), np.int64)
  lengths, labels, batch = _sequence_stats(batches)
  uses = _uses(cfg, lengths, labels)
  n_batches = len(batches)
  label_tokens = np.bincount(batch, weights=labels, minlength=n_batches)
  rec = np.asarray(indices, np.int64)[order]
  if np.any(memo.offsets[rec + 1] - memo.offsets[rec] != uses):
    raise ValueError("memo rows do not match this step's records (different tokenizer or data?)")
  slots = np.concatenate([memo.offsets[r] + np.arange(u) for r, u in zip(rec, uses)])
  weight = np.repeat(1.0 / np.maximum(label_tokens[batch], 1.0), uses)
  row_batch = np.repeat(np.asarray(batch, np.int64), uses)
  memo.rows = max(memo.rows, padded_rows(len(slots), cfg.chunk)[0])

  def padded(x, dtype, value):
    out = np.full((memo.rows,), value, dtype)
    out[:len(x)] = x
    return out

  return MemoRows(padded(slots, np.int32, memo.n_slots), padded(weight, np.float32, 0.0),
                  padded(np.ones(len(slots)), np.float32, 0.0),
                  padded(row_batch, np.int32, n_batches),
                  np.bincount(row_batch, minlength=n_batches).astype(np.int32))


def put(rows: MemoRows, mesh=None) -> MemoRows:
  """Device arrays of a step's MemoRows (rows split like the packed cache rows)."""
  return program.put(rows, mesh)
