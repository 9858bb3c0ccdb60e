"""An edit request tokenized the way ROME / MEMIT / AlphaEdit read it (host side, NumPy).

For a record (prompt, subject, target) and the context templates T_0 = "{}", T_1, ...:

  target ids   tok(" " + target, no special tokens) (a leading BOS/UNK dropped)
  prompt       the record's prompt with its subject replaced by "{}" (the subject must occur once)
  rewrites     T_j(prompt) + decode(target ids[:-1]), subject filled in, one row per template; the
               NLL labels are the target ids on the last len(target) positions (logits at the last
               prompt token predict the first target token)
  KL prompt    "{subject} is a"
  key rows     T_j(prompt), subject filled in (no target)
  lookup       per row: len(tok(text before the subject + subject)) - 1, BOS counted (the
               reference's `subject_last`); rows are right-padded, so positions need no shift

Rows are padded to a power-of-two length so the jitted programs see few shapes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from horse_jax.data.tokenize import IGNORE, bucket_length, padding_id
from horse_jax.errors import UserError


class Rows(NamedTuple):
  """Right-padded token rows with one lookup position each (NumPy int32).

  Attributes:
    input_ids: [R, T].
    attention_mask: [R, T].
    lookup: [R] the subject's last token.
    labels: [R, T] target ids where logits there predict them, else -100 (rewrite rows only).
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  lookup: np.ndarray
  labels: np.ndarray


class Request(NamedTuple):
  """One edit as the z optimisation and the key computation need it.

  Attributes:
    z_rows: the rewrite rows (one per template, "{}" first) then the KL row.
    n_rewrites: how many of `z_rows` are rewrite rows.
    key_rows: one row per template ("{}" first: its key is the bare prompt's).
    groups: [G] number of key rows per template group (ROME: one group; MEMIT: ["{}"], the rest).
    n_target: number of target tokens.
  """

  z_rows: Rows
  n_rewrites: int
  key_rows: Rows
  groups: tuple[int, ...]
  n_target: int


def subject_template(prompt: str, subject: str | None, where: str) -> str:
  """The prompt with its subject replaced by "{}" (UserError unless it occurs exactly once)."""
  if not subject:
    raise UserError(f"{where}: no subject (ROME/MEMIT/AlphaEdit need the record's `subject` field)")
  count = prompt.count(subject)
  if count != 1:
    raise UserError(f"{where}: subject {subject!r} occurs {count} times in the prompt {prompt!r} "
                    "(expected exactly once)")
  return prompt.replace(subject, "{}")


def _ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text)["input_ids"])


def lookup_index(tokenizer, template: str, subject: str) -> int:
  """The subject's last token in `template` filled with `subject`: len(tok(prefix + subject)) - 1."""
  prefix = template.split("{}", 1)[0]
  return len(_ids(tokenizer, prefix + subject)) - 1


def target_ids(tokenizer, target: str) -> list[int]:
  """tok(" " + target) without special tokens, a leading BOS/UNK dropped (non-empty)."""
  text = target if target.startswith(" ") else " " + target
  ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
  if ids and ids[0] in (tokenizer.bos_token_id, tokenizer.unk_token_id):
    ids = ids[1:]
  if not ids:
    raise UserError(f"target {target!r} tokenizes to nothing")
  return ids


def pad_rows(tokenizer, texts: Sequence[str], lookups: Sequence[int], labels=None,
             length: int | None = None, max_length: int | None = None, where: str = "") -> Rows:
  """Tokenizes `texts` (BOS added) into right-padded rows."""
  seqs = [_ids(tokenizer, t) for t in texts]
  longest = max(len(s) for s in seqs)
  if max_length is not None and longest > max_length:
    raise UserError(f"{where}: a prompt is {longest} tokens, longer than data.max_length={max_length}")
  width = length or bucket_length(longest)
  pad = padding_id(tokenizer)
  ids = np.full((len(seqs), width), pad, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  lab = np.full((len(seqs), width), IGNORE, np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
    if labels is not None and labels[i] is not None:
      n = len(labels[i])
      lab[i, len(s) - n:len(s)] = labels[i]
  return Rows(ids, mask, np.asarray(lookups, np.int32), lab)


def build_request(tokenizer, prompt: str, subject: str, target: str, templates: Sequence[str],
                  grouped: bool, max_length: int | None = None, where: str = "record") -> Request:
  """A `Request` of one edit.

  Args:
    tokenizer: the model's tokenizer.
    prompt, subject, target: the edit.
    templates: the context templates besides "{}" (each holds one "{}").
    grouped: MEMIT/AlphaEdit: keys average within ["{}"] and within `templates`, then across the
      two groups; ROME (False): over all templates at once.
    max_length: refuse prompts longer than this many tokens.
    where: what to name in errors.
  """
  tmpl = subject_template(prompt, subject, where)
  tgt = target_ids(tokenizer, target)
  suffix = tokenizer.decode(tgt[:-1])
  contexts = ["{}"] + list(templates)
  # A template's "{}" is the prompt's place; the prompt's "{}" is the subject's.
  filled = [c.replace("{}", tmpl, 1) for c in contexts]
  rewrites = [f + suffix for f in filled]
  z_templates = rewrites + ["{} is a"]
  z_rows = pad_rows(tokenizer, [t.replace("{}", subject, 1) for t in z_templates],
                    [lookup_index(tokenizer, t, subject) for t in z_templates],
                    [tgt] * len(rewrites) + [None], max_length=max_length, where=where)
  key_rows = pad_rows(tokenizer, [t.replace("{}", subject, 1) for t in filled],
                      [lookup_index(tokenizer, t, subject) for t in filled], max_length=max_length,
                      where=where)
  groups = (1, len(templates)) if grouped and templates else (len(contexts),)
  return Request(z_rows, len(rewrites), key_rows, groups, len(tgt))


def record_fields(record, index: int) -> tuple[str, str, str, str]:
  """(prompt, subject, target, where) of an EditRecord (the subject from its `extra`)."""
  where = f"record {index}"
  subject = (record.extra or {}).get("subject")
  return record.prompt, subject, record.target, where
