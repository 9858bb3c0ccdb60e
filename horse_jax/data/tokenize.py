"""Tokenization of (prompt, target) pairs exactly as the HORSE/MALMEN reference does it.

  input_ids = tok(prompt) ++ tok(" " + target, no special tokens)[:-1]
  labels    = [-100] * (len(tok(prompt)) - 1) ++ tok(" " + target)

Labels are aligned with the logits (logits at position j predict labels[j]); no further shift.
Batches are right-padded (labels -100, mask 0) to a bucketed length so jitted code sees few shapes.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import numpy as np

IGNORE = -100


class EditBatch(NamedTuple):
  """A right-padded batch of tokenized (prompt, target) pairs (NumPy int32 arrays).

  Attributes:
    input_ids: [B, T].
    attention_mask: [B, T], 1 for real tokens.
    labels: [B, T], target token ids where logits[:, j] should predict them, else -100.
    prompt_len: [B], number of prompt tokens (BOS included); the last prompt token is at
      prompt_len - 1 and its logits predict the first target token.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  prompt_len: np.ndarray


def bucket_length(n: int, minimum: int = 8) -> int:
  """Smallest power of two >= max(n, minimum): keeps the number of compiled shapes logarithmic."""
  size = minimum
  while size < n:
    size *= 2
  return size


def bucket_lengths(n_N: np.ndarray, minimum: int = 8) -> np.ndarray:
  """`bucket_length` of every entry of an integer array (vectorized)."""
  n = np.maximum(np.asarray(n_N, np.int64), 1)
  return np.maximum(np.left_shift(1, np.ceil(np.log2(n)).astype(np.int64)), minimum)


class TokenTable(NamedTuple):
  """Every (prompt, target) pair of a list tokenized at once (`tokenize_table`), NumPy arrays.

  Attributes:
    input_ids: [N, W] right-padded with the pad id (W = `bucket_length` of the longest pair).
    labels: [N, W], as `tokenize_edit` makes them, -100 at padded positions.
    lengths: [N], tokens of each pair after truncation (its attended positions).
    prompt_len: [N], prompt tokens after truncation (at least 1).
    truncated: how many pairs were longer than max_length (their prompt start dropped).
    pad_id: the id at padded positions.
  """

  input_ids: np.ndarray
  labels: np.ndarray
  lengths: np.ndarray
  prompt_len: np.ndarray
  truncated: int
  pad_id: int

  def batch(self, rows: np.ndarray, length: int, scored: int | None = None) -> EditBatch:
    """EditBatch of `rows` padded to `length` columns; rows from position `scored` on get no labels
    (filler rows of a short chunk)."""
    extra = max(length - self.input_ids.shape[1], 0)  # columns beyond the table's width: padding
    ids = self.input_ids[rows, :length]  # indexing by an array copies: the table stays as it is
    labels = self.labels[rows, :length]
    if extra:
      ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=self.pad_id)
      labels = np.pad(labels, ((0, 0), (0, extra)), constant_values=IGNORE)
    if scored is not None:
      labels[scored:] = IGNORE
    mask = (np.arange(length)[None, :] < self.lengths[rows, None]).astype(np.int32)
    return EditBatch(ids, mask, labels, self.prompt_len[rows])


def _ragged(lists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(flat values, offsets, lengths) of a list of integer lists."""
  lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
  flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(lengths.sum()))
  return flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths


def _distinct(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(distinct texts in first-seen order, index of each text among them)."""
  index: dict[str, int] = {}
  inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64, len(texts))
  return list(index), inverse


def tokenize_table(tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                   max_length: int | None = None, target_prefix: str = " ",
                   pad_id: int | None = None, rows_per_step: int = 8192) -> TokenTable:
  """Tokenizes many pairs in bulk: `tokenize_edit` of each pair (truncated on the left to
  `max_length` as `tokenize_edits` does), with one tokenizer call per distinct text list and the
  rows assembled by NumPy indexing instead of per-pair Python.

  Args:
    tokenizer: a transformers tokenizer.
    prompts: prompts, one per pair.
    targets: targets, one per pair (non-empty after tokenization).
    max_length: keep at most this many tokens per pair (the prompt start is dropped).
    target_prefix: prepended to targets before tokenizing.
    pad_id: id at padded positions; default `padding_id(tokenizer)`.
    rows_per_step: rows assembled per NumPy step (bounds the temporaries).

  Returns:
    TokenTable of the N pairs.
  """
  if len(prompts) != len(targets):
    raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
  pad_id = padding_id(tokenizer) if pad_id is None else int(pad_id)
  uniq_p, inv_p = _distinct(prompts)
  uniq_t, inv_t = _distinct(targets)
  p_flat, p_off, p_len = _ragged(tokenizer(uniq_p)["input_ids"] if uniq_p else [])
  t_flat, t_off, t_len = _ragged(tokenizer([target_prefix + t for t in uniq_t],
                                           add_special_tokens=False)["input_ids"] if uniq_t else [])
  empty = np.flatnonzero(t_len == 0)
  if empty.size:
    raise ValueError(f"target {uniq_t[int(empty[0])]!r} tokenizes to nothing")
  plen, tlen = p_len[inv_p], t_len[inv_t]
  total = plen + tlen - 1  # prompt ++ target[:-1]
  cut = np.maximum(total - max_length, 0) if max_length is not None else np.zeros_like(total)
  lengths = total - cut
  width = bucket_length(int(lengths.max())) if len(lengths) else 8
  ids = np.full((len(total), width), pad_id, np.int32)
  labels = np.full((len(total), width), IGNORE, np.int32)
  for s in range(0, len(total), rows_per_step):
    sl = slice(s, s + rows_per_step)
    pl, tl, po, to = plen[sl, None], tlen[sl, None], p_off[inv_p[sl], None], t_off[inv_t[sl], None]

    def token_at(j):
      """Token at position j of the untruncated sequence prompt ++ target (j < plen + tlen)."""
      from_prompt = p_flat[po + np.minimum(j, pl - 1)] if p_flat.size else 0
      return np.where(j < pl, from_prompt, t_flat[to + np.clip(j - pl, 0, tl - 1)])

    col = np.arange(width)[None, :] + cut[sl, None]  # untruncated position of each column
    live = np.arange(width)[None, :] < lengths[sl, None]
    ids[sl] = np.where(live, token_at(np.where(live, col, 0)), pad_id)
    # labels[j] = sequence[j + 1] from the last prompt token on (logits at j predict token j + 1).
    scored = live & (col + 1 >= pl)
    labels[sl] = np.where(scored, token_at(np.where(scored, col + 1, 0)), IGNORE)
  return TokenTable(ids, labels, lengths.astype(np.int32),
                    np.maximum(plen - cut, 1).astype(np.int32), int(np.count_nonzero(cut)), pad_id)


def tokenize_edit(tokenizer, prompt: str, target: str, target_prefix: str = " "):
  """(input_ids, labels, prompt_len) as Python lists for one pair (see module docstring)."""
  prompt_ids = list(tokenizer(prompt)["input_ids"])
  target_ids = list(tokenizer(target_prefix + target, add_special_tokens=False)["input_ids"])
  if not target_ids:
    raise ValueError(f"target {target!r} tokenizes to nothing")
  input_ids = prompt_ids + target_ids[:-1]
  labels = [IGNORE] * (len(prompt_ids) - 1) + target_ids
  return input_ids, labels, len(prompt_ids)


def tokenize_edits(tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                   pad_to: int | None = None, max_length: int | None = None,
                   target_prefix: str = " ", pad_id: int | None = None) -> EditBatch:
  """Tokenizes and right-pads a batch of (prompt, target) pairs.

  Args:
    tokenizer: a transformers tokenizer.
    prompts: prompts, one per pair.
    targets: targets, one per pair (non-empty).
    pad_to: sequence length to pad to; default `bucket_length` of the longest pair.
    max_length: truncate the *left* of longer pairs (the prompt start) to this many tokens.
    target_prefix: prepended to targets before tokenizing (a space for BPE tokenizers).
    pad_id: id for padded input positions; default the tokenizer's pad, else eos, else 0.

  Returns:
    EditBatch of int32 arrays.
  """
  table = tokenize_table(tokenizer, prompts, targets, max_length=max_length,
                         target_prefix=target_prefix, pad_id=pad_id)
  longest = int(table.lengths.max())
  length = pad_to if pad_to is not None else bucket_length(longest)
  if longest > length:
    raise ValueError(f"pair of {longest} tokens does not fit pad_to={length}")
  return table.batch(np.arange(len(table.lengths)), length)


def padding_id(tokenizer) -> int:
  """The id written at padded positions: the tokenizer's pad token, else eos, else 0."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def concat_batches(batches: Sequence[EditBatch], pad_id: int) -> EditBatch:
  """One batch of all rows, in order, right-padded to the longest batch's length.

  Args:
    batches: right-padded batches (possibly of different lengths).
    pad_id: id written at the added padded positions (`padding_id`).

  Returns:
    EditBatch of sum(B) rows and max(T) columns.
  """
  length = max(b.input_ids.shape[1] for b in batches)

  def widen(x, fill):
    extra = length - x.shape[1]
    return np.pad(x, ((0, 0), (0, extra)), constant_values=fill) if extra else x

  return EditBatch(np.concatenate([widen(b.input_ids, pad_id) for b in batches]),
                   np.concatenate([widen(b.attention_mask, 0) for b in batches]),
                   np.concatenate([widen(b.labels, IGNORE) for b in batches]),
                   np.concatenate([b.prompt_len for b in batches]))
