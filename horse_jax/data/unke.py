"""UnKE unstructured editing: records, prompts and tokenization of long free-text answers.

An UnKE record is `{question, para_question, answer, sub_question[], sub_answer[]}`; the loader
(`horse_jax.data.loaders`, format "unke") maps it to an `EditRecord` with prompt = question,
target = answer, rephrase = para_question, portability = the (sub_question, sub_answer) pairs and
extra["format"] = "unke".

Prompts follow the model's chat template when the tokenizer has one: the question is the user
turn, followed by the assistant header (`apply_chat_template(..., add_generation_prompt=True)`), and
the target is the answer followed by the template's end-of-turn token, so an edited model also
learns to stop. Without a chat template the prompt is the plain question (with the tokenizer's usual
special tokens) and the target is " " + answer followed by eos (when the tokenizer has one).

Edit batches are right-padded to a power-of-two length (`bucket_length`), so targets of hundreds of
tokens compile one edit program per bucket, not one per length. A pair longer than `max_length`
loses the tail of its answer first (it cannot be trained beyond the context), then the start of
its prompt.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import IGNORE, EditBatch, bucket_length, tokenize_edits

FORMAT = "unke"
_SENTINEL = "HORSEJAXANSWERSENTINEL"


def is_unke(record: EditRecord) -> bool:
  """Whether a record came from an UnKE file (scored by generation with text metrics)."""
  return record.extra.get("format") == FORMAT


def load_unke(path: str | os.PathLike, skip_invalid: bool = False,
              limit: int | None = None) -> list[EditRecord]:
  """Loads UnKE records (errors name the file, the record and the field, like every loader).

  Args:
    path: JSON list or JSON Lines file, or `hf:owner/name[:split]`.
    skip_invalid: report and skip malformed records instead of raising at the first.
    limit: keep the first N valid records.

  Returns:
    EditRecords with extra["format"] == "unke".
  """
  from horse_jax.data.loaders import load_records  # noqa: PLC0415  (loaders import this module's users)
  return load_records(path, fmt=FORMAT, skip_invalid=skip_invalid, limit=limit)


def looks_like_unke(path: str | os.PathLike) -> bool:
  """Cheap check of a local file's first record for the UnKE fields (question and answer, no
  field of another format); False when the file cannot be read (the loader reports why)."""
  path = os.fspath(path)
  if path.startswith("hf:") or not os.path.isfile(path):
    return False
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
      rows = json.loads(text)
      row = rows[0] if rows else None
    else:
      line = next((ln for ln in text.splitlines() if ln.strip()), "")
      row = json.loads(line) if line else None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return False
  if not isinstance(row, Mapping):
    return False
  from horse_jax.data.loaders import detect_format  # noqa: PLC0415
  return detect_format(row) == FORMAT


# --------------------------------------------------------------------------------------------------
# Prompts and targets.


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def _ids(out) -> list[int]:
  """Token ids from `apply_chat_template(tokenize=True)` (a list, or a BatchEncoding in v5)."""
  if isinstance(out, Mapping) or hasattr(out, "keys"):
    out = out["input_ids"]
  out = list(out)
  if out and isinstance(out[0], (list, tuple)):
    out = list(out[0])
  return [int(x) for x in out]


def prompt_ids(tokenizer, question: str) -> list[int]:
  """Token ids of the prompt for `question` (chat template with the assistant header, or plain)."""
  if has_chat_template(tokenizer):
    return _ids(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True))
  return [int(x) for x in tokenizer(question)["input_ids"]]


def end_of_turn_id(tokenizer) -> int | None:
  """The token that ends an assistant turn: with a chat template, the first token the template
  writes after the assistant's content when it is a special token (Llama-3 `<|eot_id|>`, Qwen
  `<|im_end|>`, Gemma `<end_of_turn>`); otherwise eos (None if the tokenizer has none)."""
  eos = tokenizer.eos_token_id
  if not has_chat_template(tokenizer):
    return eos
  try:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False)
  except Exception:  # noqa: BLE001  (a template that cannot render an assistant turn: fall back)
    return eos
  if not isinstance(text, str) or _SENTINEL not in text:
    return eos
  suffix = text.split(_SENTINEL, 1)[1]
  ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
  special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
  if ids and int(ids[0]) in special:
    return int(ids[0])
  return eos


def target_ids(tokenizer, answer: str) -> list[int]:
  """Token ids of the target: the answer, then the end-of-turn token (see module docstring)."""
  prefix = "" if has_chat_template(tokenizer) else " "
  ids = [int(x) for x in tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]]
  end = end_of_turn_id(tokenizer)
  if end is not None:
    ids.append(int(end))
  if not ids:
    raise ValueError(f"answer {answer!r} tokenizes to nothing")
  return ids


def stop_ids(tokenizer) -> tuple[int, ...]:
  """Token ids that end a generated answer (end of turn and eos)."""
  ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
  return tuple(sorted(int(x) for x in ids if x is not None))


# --------------------------------------------------------------------------------------------------
# Tokenization.


def fit_pair(prompt: Sequence[int], target: Sequence[int],
             max_length: int | None) -> tuple[list[int], list[int]]:
  """(prompt, target) cut so that prompt + target[:-1] fits `max_length` tokens: the answer's tail
  goes first (at least one target token stays), then the prompt's start."""
  prompt, target = list(prompt), list(target)
  if max_length is None or len(prompt) + len(target) - 1 <= max_length:
    return prompt, target
  keep = max(max_length + 1 - len(prompt), 1)
  target = target[:keep]
  if len(prompt) + len(target) - 1 > max_length:
    prompt = prompt[len(prompt) + len(target) - 1 - max_length:]
  return prompt, target


def tokenize_pairs(tokenizer, questions: Sequence[str], answers: Sequence[str], *,
                   pad_to: int | None = None, max_length: int | None = None,
                   pad_id: int | None = None) -> EditBatch:
  """Right-padded EditBatch of UnKE (question, answer) pairs.

    input_ids = prompt ++ target[:-1],  labels = [-100] * (len(prompt) - 1) ++ target

  Args:
    tokenizer: the model's tokenizer.
    questions: one question per pair (turned into prompts by `prompt_ids`).
    answers: one answer per pair (targets by `target_ids`).
    pad_to: padded length; default `bucket_length` of the longest pair (a power of two >= 8).
    max_length: the model's context; longer pairs are cut (`fit_pair`).
    pad_id: filler id; default pad, else eos, else 0.

  Returns:
    EditBatch of int32 arrays (labels aligned with the logits, as `tokenize_edits` makes them).
  """
  rows = [fit_pair(prompt_ids(tokenizer, q), target_ids(tokenizer, a), max_length)
          for q, a in zip(questions, answers)]
  longest = max(len(p) + len(t) - 1 for p, t in rows)
  length = pad_to if pad_to is not None else bucket_length(longest)
  if longest > length:
    raise ValueError(f"pair of {longest} tokens does not fit pad_to={length}")
  if pad_id is None:
    pad_id = next((int(x) for x in (tokenizer.pad_token_id, tokenizer.eos_token_id) if x is not None), 0)
  b = len(rows)
  input_ids = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  labels = np.full((b, length), IGNORE, np.int32)
  prompt_len = np.zeros((b,), np.int32)
  for i, (prompt, target) in enumerate(rows):
    ids = prompt + target[:-1]
    input_ids[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
    labels[i, len(prompt) - 1:len(prompt) - 1 + len(target)] = target
    prompt_len[i] = len(prompt)
  return EditBatch(input_ids, mask, labels, prompt_len)


def tokenize_record(tokenizer, record: EditRecord, max_length: int | None = None) -> EditBatch:
  """The one-row edit batch of a record: UnKE records by `tokenize_pairs`, others as every editor
  tokenizes them (`tokenize_edits`)."""
  if is_unke(record):
    return tokenize_pairs(tokenizer, [record.prompt], [record.target], max_length=max_length)
  return tokenize_edits(tokenizer, [record.prompt], [record.target], max_length=max_length)


def record_fields(record: EditRecord) -> dict[str, Any]:
  """The UnKE fields of a record, as in the file (for reports)."""
  return {"question": record.prompt, "para_question": record.rephrase, "answer": record.target,
          "sub_question": [q for q, _ in record.portability],
          "sub_answer": [a for _, a in record.portability]}
