"""Scoring of UnKE (unstructured) edits: greedy generations compared with the reference answers.

For every record the edited model (and the unedited one, when given) generates greedily, up to
`max_new_tokens` (512 by default, as the reference; never past the model's context), for the
question, the paraphrase and each sub-question. The text up to the first end-of-turn / eos token is
compared with the record's answer (question, paraphrase) or with the sub-question's own answer, by
`horse_jax.eval.text_metrics`: BLEU-1-like and ROUGE-1/2/L recall. Sub-question scores are averaged
within the record first, then over records.

Per-record keys (None when the record lacks that prompt; `pre_` prefix for the unedited model):
  {question,para_question,sub_question}_{bleu1,rouge1_recall,rouge2_recall,rougeL_recall}
  question_token_acc, para_question_token_acc: teacher-forced token accuracy of answer + end-of-turn
    (when a logits function is given), i.e. how much of the long target the edit reproduces.
  generations / pre_generations: the generated texts {question, para_question, sub_question: [...]}.
Summary: n_records, the mean of each score key over the records that have it, and `counts`.

Prompts are left-padded into power-of-two length buckets and batches of a fixed size, so generation
compiles one program per prompt bucket; all device results are fetched once at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from horse_jax.data import unke
from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import IGNORE, bucket_length
from horse_jax.eval import metrics, text_metrics
from horse_jax.eval.scoring import PromptPair, padding_id, record_pairs

KINDS = ("question", "para_question", "sub_question")
DEFAULT_MAX_NEW_TOKENS = 512


# UnKE's names of the scored prompt kinds (UnKE records have no locality prompt).
_KIND_NAMES = {"edit": "question", "rephrase": "para_question", "port": "sub_question"}


def prompts_of(records: Sequence[EditRecord]) -> list[PromptPair]:
  """Every (question, reference answer) to generate for, tagged with its record and UnKE kind."""
  return [dataclasses.replace(p, kind=_KIND_NAMES[p.kind]) for p in record_pairs(records)
          if p.kind in _KIND_NAMES]


def _fill(rows: list[int], size: int) -> list[int]:
  return rows + [rows[0]] * (size - len(rows))


def generation_jobs(prompts: Sequence[PromptPair], tokenizer, batch_size: int, max_new_tokens: int,
                    max_length: int | None):
  """(chunk of prompt indices, left-padded ids [B, L], mask [B, L], new tokens) per call.

  L is a power-of-two bucket of the prompt length; new = min(max_new_tokens, max_length - L), so a
  generation never runs past the context (prompts longer than it lose their start).
  """
  pad_id = padding_id(tokenizer)
  ids_of = []
  for p in prompts:
    ids = unke.prompt_ids(tokenizer, p.prompt)
    if max_length is not None and len(ids) > max_length - 1:
      ids = ids[len(ids) - (max_length - 1):]
    ids_of.append(ids)
  buckets: dict[int, list[int]] = {}
  for j, ids in enumerate(ids_of):
    length = bucket_length(len(ids))
    if max_length is not None:
      length = min(length, max_length - 1)
    buckets.setdefault(length, []).append(j)
  for length, idx in sorted(buckets.items()):
    new = max_new_tokens if max_length is None else max(min(max_new_tokens, max_length - length), 1)
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      ids = np.full((batch_size, length), pad_id, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for b, j in enumerate(_fill(chunk, batch_size)):
        ids[b, length - len(ids_of[j]):] = ids_of[j]
        mask[b, length - len(ids_of[j]):] = 1
      yield chunk, ids, mask, new


def decode_answer(tokenizer, tokens: Sequence[int], stops: Sequence[int]) -> str:
  """The generated text up to (not including) the first stop token, without special tokens."""
  tokens = [int(t) for t in tokens]
  cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
  return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


def generate_texts(prompts: Sequence[PromptPair], tokenizer, generate_fn: Callable, *, batch_size: int,
                   max_new_tokens: int, max_length: int | None, progress: bool = False,
                   desc: str = "generation") -> list[str]:
  """Greedy answers (text) for every prompt, in order."""
  results = []
  jobs = list(generation_jobs(prompts, tokenizer, batch_size, max_new_tokens, max_length))
  for chunk, ids, mask, new in tqdm(jobs, desc=desc, unit="batch", disable=not progress, leave=False):
    results.append((chunk, jnp.asarray(generate_fn(ids, mask, new))[:, :new]))
  stops = unke.stop_ids(tokenizer)
  texts = [""] * len(prompts)
  for chunk, tokens in jax.device_get(results):  # one sync for every batch
    for row, j in enumerate(chunk):
      texts[j] = decode_answer(tokenizer, tokens[row], stops)
  return texts


def teacher_forced(prompts: Sequence[PromptPair], tokenizer, logits_fn: Callable, *, batch_size: int,
                   max_length: int | None) -> np.ndarray:
  """Teacher-forced token accuracy of answer + end-of-turn for each prompt (NaN for filler)."""
  lengths = []
  for p in prompts:
    prompt, target = unke.fit_pair(unke.prompt_ids(tokenizer, p.prompt),
                                   unke.target_ids(tokenizer, p.answer), max_length)
    lengths.append(len(prompt) + len(target) - 1)
  buckets: dict[int, list[int]] = {}
  for j, n in enumerate(lengths):
    buckets.setdefault(bucket_length(n), []).append(j)
  results = []
  for length, idx in sorted(buckets.items()):
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      rows = _fill(chunk, batch_size)
      batch = unke.tokenize_pairs(tokenizer, [prompts[j].prompt for j in rows],
                                  [prompts[j].answer for j in rows], pad_to=length,
                                  max_length=max_length)
      labels = batch.labels.copy()
      labels[len(chunk):] = IGNORE
      results.append((chunk, metrics.token_accuracy(logits_fn(batch._replace(labels=labels)), labels)))
  acc = np.full(len(prompts), np.nan)
  for chunk, values in jax.device_get(results):
    acc[chunk] = np.asarray(values)[:len(chunk)]
  return acc


def _empty_record(i: int, r: EditRecord, runs) -> dict[str, Any]:
  """A record's row with every key that some given function will fill (None until scored)."""
  kinds = ["question"] + (["para_question"] if r.rephrase else []) + (
      ["sub_question"] if r.portability else [])
  out: dict[str, Any] = {"index": i, "question": r.prompt, "answer": r.target}
  for prefix, gen, lg in runs:
    if lg is not None:
      out.update({f"{prefix}{k}_token_acc": None for k in kinds if k != "sub_question"})
    if gen is not None:
      out.update({f"{prefix}{k}_{name}": None for k in kinds for name in text_metrics.SCORE_NAMES})
  return out


def _fill_text_scores(per_record, prompts, texts, prefix: str) -> None:
  sums: dict[tuple[int, str], list[float]] = {}
  gens: dict[int, dict[str, Any]] = {}
  for p, text in zip(prompts, texts):
    for name, value in text_metrics.text_scores(text, p.answer).items():
      sums.setdefault((p.record, f"{prefix}{p.kind}_{name}"), []).append(value)
    g = gens.setdefault(p.record, {"question": None, "para_question": None, "sub_question": []})
    if p.kind == "sub_question":
      g["sub_question"].append(text)
    else:
      g[p.kind] = text
  for (i, key), values in sums.items():
    per_record[i][key] = float(np.mean(values))  # sub-questions: averaged within the record
  for i, g in gens.items():
    per_record[i][f"{prefix}generations"] = g


def _cached(prompts: Sequence[PromptPair], cache: dict | None, tag: tuple, compute: Callable) -> list:
  """compute(prompts) per prompt, through `cache` (keyed by tag, question, answer) when given:
  only the prompts the cache lacks are computed, each distinct one once."""
  if cache is None:
    return list(compute(list(prompts)))
  keys = [(tag, p.prompt, p.answer) for p in prompts]
  missing: dict[tuple, PromptPair] = {}
  for p, key in zip(prompts, keys):
    if key not in cache:
      missing.setdefault(key, p)
  if missing:
    for key, value in zip(missing, compute(list(missing.values()))):
      cache[key] = value
  return [cache[key] for key in keys]


def summarize(per_record: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """n_records, the mean of every numeric score key over the records that have it, and counts."""
  keys: list[str] = []
  for r in per_record:
    keys += [k for k, v in r.items() if k not in keys and k != "index"
             and (v is None or isinstance(v, (int, float))) and not isinstance(v, bool)]
  summary: dict[str, Any] = {"n_records": len(per_record)}
  counts = {}
  for key in keys:
    values = [r[key] for r in per_record if isinstance(r.get(key), (int, float))
              and not np.isnan(r[key])]
    summary[key] = float(np.mean(values)) if values else None
    counts[key] = len(values)
  summary["counts"] = counts
  return summary


def score_unke(records: Sequence[EditRecord], tokenizer, generate_fn: Callable | None = None,
               pre_generate_fn: Callable | None = None, *, logits_fn: Callable | None = None,
               pre_logits_fn: Callable | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               batch_size: int = 16, max_length: int | None = None, progress: bool = True,
               pre_cache: dict | None = None) -> dict[str, Any]:
  """Scores UnKE records by generation (and teacher forcing when logits functions are given).

  Args:
    records: UnKE records (`horse_jax.data.unke.load_unke`).
    tokenizer: the model's tokenizer (its chat template, if any, builds the prompts).
    generate_fn: (left-padded ids [B, L], mask [B, L], n) -> greedy tokens [B, >= n] of the edited
      model; None skips the generation scores.
    pre_generate_fn: the same for the unedited model (pre_* scores).
    logits_fn: right-padded EditBatch -> logits [B, T, V] of the edited model (token accuracy).
    pre_logits_fn: the same for the unedited model.
    max_new_tokens: generation budget per prompt (cut to the model's context).
    batch_size: rows per call (short chunks are filled, so shapes stay fixed).
    max_length: the model's context length (None: unlimited).
    progress: show tqdm bars.
    pre_cache: a dict shared by calls that score the same unedited model (a sweep): each prompt's
      pre-edit generation and token accuracy are computed once. Scores are the same without it.

  Returns:
    {"summary": {...}, "records": [...]} as described in the module docstring.
  """
  if not records:
    raise ValueError("no records to score")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  runs = [(prefix, gen, lg) for prefix, gen, lg in (("", generate_fn, logits_fn),
                                                      ("pre_", pre_generate_fn, pre_logits_fn))
          if gen is not None or lg is not None]
  per_record = [_empty_record(i, r, runs) for i, r in enumerate(records)]
  prompts = prompts_of(records)
  tf_prompts = [p for p in prompts if p.kind != "sub_question"]
  for prefix, gen, lg in runs:
    cache = pre_cache if prefix == "pre_" else None
    if lg is not None:

      def token_acc(ps, lg=lg):
        return teacher_forced(ps, tokenizer, lg, batch_size=batch_size, max_length=max_length)

      acc = _cached(tf_prompts, cache, ("token_acc", max_length), token_acc)
      for p, value in zip(tf_prompts, acc):
        per_record[p.record][f"{prefix}{p.kind}_token_acc"] = None if np.isnan(value) else float(value)
    if gen is not None:

      def texts_of(ps, gen=gen, desc=f"generation ({'pre-edit' if prefix else 'edited'})"):
        return generate_texts(ps, tokenizer, gen, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              max_length=max_length, progress=progress, desc=desc)

      texts = _cached(prompts, cache, ("text", max_new_tokens, max_length), texts_of)
      _fill_text_scores(per_record, prompts, texts, prefix)
  return {"summary": summarize(per_record), "records": per_record}
