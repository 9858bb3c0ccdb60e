"""LM mini-batches for the hypernetwork editors: edit, rephrase and locality batches of records."""

from __future__ import annotations

from typing import Sequence

from horse_jax.data.records import EditRecord
import numpy as np

from horse_jax.data.tokenize import IGNORE, EditBatch, tokenize_edit, tokenize_edits
from horse_jax.errors import UserError


def pair_batches(tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int, *,
                 sort: bool = False, max_length: int | None = None) -> list[EditBatch]:
  """Splits (prompt, target) pairs into right-padded mini-batches of `batch_size`.

  Args:
    tokenizer: a transformers tokenizer.
    prompts, targets: the pairs.
    batch_size: pairs per mini-batch (`data.batch_size`).
    sort: order pairs by token length, longest first (the reference does this for edits).
    max_length: left-truncate longer pairs.

  Returns:
    Mini-batches, each padded to a power-of-two length bucket.
  """
  # Every mini-batch gets the same number of rows (padding rows are fully masked) so jitted
  # functions compile once per length bucket, not once more for a short last batch.
  rows = min(batch_size, len(prompts))
  order = length_order(tokenizer, prompts, targets) if sort else list(range(len(prompts)))
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    out.append(pad_batch(tokenize_edits(tokenizer, [prompts[i] for i in idx],
                                        [targets[i] for i in idx], max_length=max_length), rows))
  return out


def length_order(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> list[int]:
  """Pair positions ordered by tokenized length, longest first (stable: ties keep file order)."""
  lengths = [len(tokenize_edit(tokenizer, p, t)[0]) for p, t in zip(prompts, targets)]
  return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def pad_batch(batch: EditBatch, rows: int) -> EditBatch:
  """Appends fully masked rows (mask 0, labels -100) up to `rows`."""
  extra = rows - batch.input_ids.shape[0]
  if extra <= 0:
    return batch
  def pad(x, value):
    return np.concatenate([x, np.full((extra,) + x.shape[1:], value, x.dtype)], axis=0)
  return EditBatch(pad(batch.input_ids, batch.input_ids[0, 0]), pad(batch.attention_mask, 0),
                   pad(batch.labels, IGNORE), pad(batch.prompt_len, 1))


def edit_batches(tokenizer, records: Sequence[EditRecord], batch_size: int,
                 max_length: int | None = None) -> list[EditBatch]:
  """(prompt, target) mini-batches, longest first."""
  return pair_batches(tokenizer, [r.prompt for r in records], [r.target for r in records],
                      batch_size, sort=True, max_length=max_length)


def rephrase_batches(tokenizer, records: Sequence[EditRecord], batch_size: int,
                     max_length: int | None = None) -> list[EditBatch]:
  """(rephrase, target) mini-batches (generalization); every record needs a rephrase."""
  for i, r in enumerate(records):
    if not r.rephrase:
      raise UserError(f"record {i}: no rephrase prompt (needed for meta-training)")
  return pair_batches(tokenizer, [r.rephrase for r in records], [r.target for r in records],
                      batch_size, max_length=max_length)


def loc_batches(tokenizer, records: Sequence[EditRecord], batch_size: int,
                max_length: int | None = None) -> list[EditBatch]:
  """(unrelated prompt, its gold answer) mini-batches (locality)."""
  for i, r in enumerate(records):
    if not r.loc_prompt or not r.loc_answer:
      raise UserError(f"record {i}: no locality prompt/answer (needed for meta-training)")
  return pair_batches(tokenizer, [r.loc_prompt for r in records], [r.loc_answer for r in records],
                      batch_size, max_length=max_length)


class MemoTokenizer:
  """A tokenizer whose plain single-string calls are memoized (meta-training re-tokenizes the same
  records every few steps); every other call and attribute goes to the wrapped tokenizer."""

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self._memo: dict = {}

  def __call__(self, text, *args, add_special_tokens: bool = True, **kwargs):
    if args or kwargs or not isinstance(text, str):
      return self._tok(text, *args, add_special_tokens=add_special_tokens, **kwargs)
    key = (text, add_special_tokens)
    hit = self._memo.get(key)
    if hit is None:
      ids = list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])
      hit = self._memo[key] = {"input_ids": ids}
    return {"input_ids": list(hit["input_ids"])}

  def __getattr__(self, name):
    return getattr(self._tok, name)


def step_indices(seed: int, step: int, n_records: int, n_edits: int) -> np.ndarray:
  """The training records of one meta-training step: a pure function of (seed, step), so a resumed
  run sees exactly the records an uninterrupted run would."""
  rng = np.random.default_rng([seed, step])
  return rng.choice(n_records, size=n_edits, replace=False)


def step_batches(tokenizer, records: Sequence[EditRecord], cfg, max_length: int | None = None):
  """(edit, rephrase, locality) LM mini-batches of one meta-training step (`cfg.lm_batch` rows)."""
  return (edit_batches(tokenizer, records, cfg.lm_batch, max_length),
          rephrase_batches(tokenizer, records, cfg.lm_batch, max_length),
          loc_batches(tokenizer, records, cfg.lm_batch, max_length))
