"""Tokenization of (prompt, target) pairs exactly as the HORSE/MALMEN reference does it.

  input_ids = tok(prompt) ++ tok(" " + target, no special tokens)[:-1]
  labels    = [-100] * (len(tok(prompt)) - 1) ++ tok(" " + target)

Labels are aligned with the logits (logits at position j predict labels[j]); no further shift.
Batches are right-padded (labels -100, mask 0) to a bucketed length so jitted code sees few shapes.
"""

from __future__ import annotations

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
  rows = [tokenize_edit(tokenizer, p, t, target_prefix) for p, t in zip(prompts, targets)]
  if max_length is not None:
    clipped = []
    for ids, labels, plen in rows:
      cut = max(len(ids) - max_length, 0)
      clipped.append((ids[cut:], labels[cut:], max(plen - cut, 1)))
    rows = clipped
  longest = max(len(ids) for ids, _, _ in rows)
  length = pad_to if pad_to is not None else bucket_length(longest)
  if longest > length:
    raise ValueError(f"pair of {longest} tokens does not fit pad_to={length}")
  if pad_id is None:
    pad_id = padding_id(tokenizer)
  b = len(rows)
  input_ids = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  labels = np.full((b, length), IGNORE, np.int32)
  prompt_len = np.zeros((b,), np.int32)
  for i, (ids, lab, plen) in enumerate(rows):
    input_ids[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
    labels[i, :len(lab)] = lab
    prompt_len[i] = plen
  return EditBatch(input_ids, mask, labels, prompt_len)


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
