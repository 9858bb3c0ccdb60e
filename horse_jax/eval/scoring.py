"""Score edit records against an edited (and optionally the unedited) model.

`score_records` tokenizes every (prompt, answer) pair a record carries (the edit prompt and the
rephrase with the new target, the unrelated prompt with its gold answer, portability pairs), sorts
them into length buckets and runs them in batches of a fixed size, so the caller's logits function and
the jitted metric kernels see one shape per bucket. Teacher-forced scores stay on device until the
end; generation-based scores run greedy decoding of exactly len(target) tokens on left-padded prompts.

Per-record keys (None when the record lacks that part or the needed function was not given):
  edit_acc, rephrase_acc, loc_acc (vs the gold unrelated answer), loc_agree (post vs pre argmax on the
  unrelated answer positions; needs pre_logits_fn), pre_edit_acc, pre_rephrase_acc, pre_loc_acc,
  port_acc / pre_port_acc (mean over the record's portability pairs);
  with generate_fn: gen_edit_acc, gen_rephrase_acc, gen_loc_acc, gen_port_acc, and with
  pre_generate_fn also gen_loc_agree (post vs pre generations on the unrelated prompt) and pre_gen_*.
Summary: the mean of each key over the records that have it, `counts`, the whole-answer shares
  edit_exact / rephrase_exact (and pre_*: records whose score is 1, i.e. every target token right), and
  overall = mean(edit_acc, rephrase_acc, locality) with `overall_locality` naming the locality used
  (loc_agree when the pre-edit model was scored, else loc_acc); gen_overall likewise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import (IGNORE, EditBatch, TokenTable, bucket_length, bucket_lengths,
                                     tokenize_table)
from horse_jax import inflight
from horse_jax.eval import metrics
from horse_jax.io import atomic_write_json

LogitsFn = Callable[[EditBatch], Any]
GenerateFn = Callable[[Any, Any, int], Any]

# Which per-record key each kind of pair fills (teacher-forced post, pre; generation post, pre).
KINDS = ("edit", "rephrase", "loc", "port")
_TF_KEYS = {"edit": ("edit_acc", "pre_edit_acc"), "rephrase": ("rephrase_acc", "pre_rephrase_acc"),
            "loc": ("loc_acc", "pre_loc_acc"), "port": ("port_acc", "pre_port_acc")}
_GEN_KEYS = {"edit": ("gen_edit_acc", "pre_gen_edit_acc"), "rephrase": ("gen_rephrase_acc", "pre_gen_rephrase_acc"),
             "loc": ("gen_loc_acc", "pre_gen_loc_acc"), "port": ("gen_port_acc", "pre_gen_port_acc")}


@dataclasses.dataclass(frozen=True)
class PromptPair:
  """One prompt to score (or generate for) and its reference answer, of record `record`.

  Attributes:
    record: index of the record in the scored list.
    kind: which of the record's prompts it is ("edit", "rephrase", "loc", "port").
    prompt, answer: the texts.
  """

  record: int
  kind: str
  prompt: str
  answer: str


def record_pairs(records: Sequence[EditRecord]) -> list[PromptPair]:
  """Every (prompt, answer) pair to score, tagged with its record index and kind."""
  pairs = []
  for i, r in enumerate(records):
    pairs.append(PromptPair(i, "edit", r.prompt, r.target))
    if r.rephrase:
      pairs.append(PromptPair(i, "rephrase", r.rephrase, r.target))
    if r.loc_prompt and r.loc_answer:
      pairs.append(PromptPair(i, "loc", r.loc_prompt, r.loc_answer))
    for prompt, answer in r.portability:
      pairs.append(PromptPair(i, "port", prompt, answer))
  return pairs


def padding_id(tokenizer) -> int:
  """The id batches are padded with: the tokenizer's pad token, else its eos token, else 0."""
  for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if value is not None:
      return int(value)
  return 0


def _chunks(order: Sequence[int], size: int):
  for start in range(0, len(order), size):
    yield list(order[start:start + size])


def _fill(rows: list[int], size: int) -> list[int]:
  """Pads a short chunk to `size` rows by repeating its first row (scored, then dropped)."""
  return rows + [rows[0]] * (size - len(rows))


@jax.jit
def _tf_scores_post(post_BxTxV, labels_BxT):
  return metrics.token_accuracy(post_BxTxV, labels_BxT)


@jax.jit
def _tf_scores_both(post_BxTxV, pre_BxTxV, labels_BxT):
  return (metrics.token_accuracy(post_BxTxV, labels_BxT), metrics.token_accuracy(pre_BxTxV, labels_BxT),
          metrics.agreement(pre_BxTxV, post_BxTxV, labels_BxT))


class PreCache:
  """Pre-edit results per (prompt, answer) pair, computed once and reused by later calls.

  The unedited model does not change across the cells of a sweep, so its teacher-forced accuracy and
  answer-position argmax (for loc_agree), and its greedy generations, are computed once per pair.
  Keys include max_length, which decides the truncation.
  """

  def __init__(self):
    self.teacher: dict[tuple, tuple[float, np.ndarray]] = {}
    self.generated: dict[tuple, tuple[float, np.ndarray]] = {}


def _pair_key(pair: PromptPair, max_length) -> tuple:
  return (pair.prompt, pair.answer, max_length)


def _distinct_pairs(pairs, max_length) -> tuple[list, np.ndarray]:
  """(distinct pairs in first-seen order, index of each pair among them). Pairs with the same prompt
  and answer score the same (a row's logits depend on that row only), so each is scored once."""
  index: dict[tuple, int] = {}
  inverse = np.fromiter((index.setdefault(_pair_key(p, max_length), len(index)) for p in pairs),
                        np.int64, len(pairs))
  first = np.full(len(index), -1, np.int64)
  first[inverse[::-1]] = np.arange(len(pairs))[::-1]  # the first pair of each key
  return [pairs[j] for j in first], inverse


def _table(pairs, tokenizer, max_length, warn=True) -> TokenTable:
  """All pairs tokenized at once (`tokenize_table`), warning once about truncated ones."""
  table = tokenize_table(tokenizer, [p.prompt for p in pairs], [p.answer for p in pairs],
                         max_length=max_length, pad_id=padding_id(tokenizer))
  if table.truncated and warn:
    warnings.warn(f"{table.truncated} prompt+answer pair(s) longer than max_length={max_length} tokens "
                  "were truncated on the left (prompt start dropped)", stacklevel=5)
  return table


def _tf_jobs(table: TokenTable, batch_size):
  """(chunk of pair indices, padded rows, bucket length) per call, in length buckets (ascending) and
  pair order within a bucket; short chunks are filled by repeating their first row."""
  buckets = bucket_lengths(table.lengths)
  for length in np.unique(buckets):
    idx = np.flatnonzero(buckets == length)
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      rows = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
      yield chunk, rows, int(length)


@jax.jit
def _tf_pre_pass(pre_BxTxV, labels_BxT):
  return metrics.token_accuracy(pre_BxTxV, labels_BxT), metrics.answer_predictions(pre_BxTxV, labels_BxT)


@jax.jit
def _tf_post_with_pred(post_BxTxV, pre_pred_BxT, labels_BxT):
  return (metrics.token_accuracy(post_BxTxV, labels_BxT),
          metrics.agreement_with_predictions(pre_pred_BxT, post_BxTxV, labels_BxT))


def _uncached(pairs, table, max_length) -> list:
  """The distinct pairs whose key is not in `table` yet, in first-seen order."""
  missing, seen = [], set()
  for p in pairs:
    key = _pair_key(p, max_length)
    if key not in table and key not in seen:
      seen.add(key)
      missing.append(p)
  return missing


def _fill_pre_cache(pairs, tokenizer, pre_logits_fn, batch_size, max_length, cache: PreCache, progress):
  """Runs the unedited model on the pairs the cache lacks (each distinct pair once)."""
  missing = _uncached(pairs, cache.teacher, max_length)
  if not missing:
    return
  table = _table(missing, tokenizer, max_length, warn=False)
  results = []
  for chunk, rows, length in tqdm(list(_tf_jobs(table, batch_size)), desc="scoring (pre-edit)",
                                  unit="batch", disable=not progress, leave=False):
    batch = table.batch(rows, length, scored=len(chunk))
    results.append((chunk, batch.labels, _tf_pre_pass(pre_logits_fn(batch), batch.labels)))
    inflight.settle(results)  # unbounded dispatch deadlocks XLA's CPU client on a mesh (see inflight)
  for chunk, labels, (acc, pred) in jax.device_get(results):
    for row, j in enumerate(chunk):
      cache.teacher[_pair_key(missing[j], max_length)] = (float(acc[row]), pred[row][labels[row] != IGNORE])


def _cached_pre(pairs, table: TokenTable, cache: PreCache, max_length):
  """(pre-edit accuracy [N], pre-edit answer predictions [N, W], -1 off the labels) of every pair
  from the cache, aligned with `table`'s rows (one lookup per pair, before the scoring loop)."""
  acc = np.full(len(pairs), np.nan, np.float32)
  pred = np.full(table.labels.shape, -1, np.int32)
  answer = table.labels != IGNORE
  for j, p in enumerate(pairs):
    acc[j], pred[j, answer[j]] = cache.teacher[_pair_key(p, max_length)]
  return acc, pred


def _per_pair(results, n: int, with_pre: bool):
  """Per-pair (post, pre or None, agreement or None) float arrays (NaN where unscored) from the
  per-chunk results (chunk, post [B], pre [B] or None, agreement [B] or None), fetched in one sync."""
  post_acc = np.full(n, np.nan)
  pre_acc = np.full(n, np.nan) if with_pre else None
  agree = np.full(n, np.nan) if with_pre else None
  for chunk, post_d, pre_d, agree_d in jax.device_get(results):
    k = len(chunk)  # filler rows after k are dropped
    post_acc[chunk] = np.asarray(post_d)[:k]
    if with_pre:
      pre_acc[chunk] = np.asarray(pre_d)[:k]
      agree[chunk] = np.asarray(agree_d)[:k]
  return post_acc, pre_acc, agree


def _teacher_forced(pairs, tokenizer, post_logits_fn, pre_logits_fn, batch_size, max_length, progress,
                    cache: PreCache | None = None):
  """Per-pair (post_acc, pre_acc or None, agree or None) as NumPy float arrays.

  Each distinct (prompt, answer) pair is tokenized and scored once (`_distinct_pairs`); the host
  work is a few bulk NumPy steps, and the loop only slices rows and dispatches device programs.
  """
  distinct, inverse = _distinct_pairs(pairs, max_length)
  if pre_logits_fn is not None and cache is not None:
    _fill_pre_cache(distinct, tokenizer, pre_logits_fn, batch_size, max_length, cache, progress)
  table = _table(distinct, tokenizer, max_length)
  if pre_logits_fn is not None and cache is not None:
    pre_acc_all, pre_pred_all = _cached_pre(distinct, table, cache, max_length)
  results = []
  for chunk, rows, length in tqdm(list(_tf_jobs(table, batch_size)), desc="scoring (teacher-forced)",
                                  unit="batch", disable=not progress, leave=False):
    batch = table.batch(rows, length, scored=len(chunk))
    post = post_logits_fn(batch)
    if pre_logits_fn is None:
      results.append((chunk, _tf_scores_post(post, batch.labels), None, None))
    elif cache is None:
      results.append((chunk, *_tf_scores_both(post, pre_logits_fn(batch), batch.labels)))
    else:
      post_acc, agree = _tf_post_with_pred(post, pre_pred_all[rows, :length], batch.labels)
      results.append((chunk, post_acc, pre_acc_all[rows], agree))
    inflight.settle(results)
  scores = _per_pair(results, len(distinct), pre_logits_fn is not None)
  return tuple(None if x is None else x[inverse] for x in scores)


def teacher_forced_batches(records: Sequence[EditRecord], tokenizer, *, batch_size: int = 64,
                           max_length: int | None = None) -> dict[int, int]:
  """{padded length: number of batches} of `score_records`' teacher-forced pass over `records` (each
  batch runs the post-edit logits function once, and the pre-edit one when given): with a compiled
  program's cost per batch shape this gives the FLOPs of the whole pass."""
  distinct, _ = _distinct_pairs(record_pairs(records), max_length)
  buckets = bucket_lengths(_table(distinct, tokenizer, max_length, warn=False).lengths)
  return {int(n): int(-(-np.count_nonzero(buckets == n) // batch_size)) for n in np.unique(buckets)}


def _gen_inputs(pairs, tokenizer, max_length):
  prompts, answers = [], []
  for p in pairs:
    prompt_ids = list(tokenizer(p.prompt)["input_ids"])
    answer_ids = list(tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"])
    if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
      prompt_ids = prompt_ids[-max(max_length - len(answer_ids), 1):]
    prompts.append(prompt_ids)
    answers.append(answer_ids)
  return prompts, answers


def _gen_jobs(pairs, tokenizer, batch_size, max_length):
  """(chunk, left-padded ids, mask, target ids, target lengths, new tokens) per generation call."""
  pad_id = padding_id(tokenizer)
  prompts, answers = _gen_inputs(pairs, tokenizer, max_length)
  buckets: dict[tuple[int, int], list[int]] = {}
  for j in range(len(pairs)):
    key = (bucket_length(len(prompts[j])), bucket_length(len(answers[j]), minimum=4))
    buckets.setdefault(key, []).append(j)
  for (length, new), idx in sorted(buckets.items()):
    for chunk in _chunks(idx, batch_size):
      rows = _fill(chunk, batch_size)
      ids = np.full((batch_size, length), pad_id, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      target = np.full((batch_size, new), -1, np.int32)
      target_len = np.zeros((batch_size,), np.int32)
      for b, j in enumerate(rows):
        ids[b, length - len(prompts[j]):] = prompts[j]  # left-padded
        mask[b, length - len(prompts[j]):] = 1
        target[b, :len(answers[j])] = answers[j]
        target_len[b] = len(answers[j]) if b < len(chunk) else 0
      yield chunk, ids, mask, target, target_len, new


def _generate(fn, ids, mask, new):
  return jnp.asarray(fn(ids, mask, new))[:, :new]


def _generation(pairs, tokenizer, generate_fn, pre_generate_fn, batch_size, max_length, progress,
                cache: PreCache | None = None):
  """Per-pair (post gen acc, pre gen acc or None, post-vs-pre agreement or None)."""
  if pre_generate_fn is not None and cache is not None:
    missing = _uncached(pairs, cache.generated, max_length)
    done = []
    for chunk, ids, mask, target, target_len, new in tqdm(
        list(_gen_jobs(missing, tokenizer, batch_size, max_length)),
        desc="generation (pre-edit)", unit="batch", disable=not progress or not missing, leave=False):
      pre = _generate(pre_generate_fn, ids, mask, new)
      done.append((chunk, target_len, pre, metrics.generation_accuracy(pre, target, target_len)))
      inflight.settle(done)
    for chunk, target_len, pre, acc in jax.device_get(done):
      for row, j in enumerate(chunk):
        cache.generated[_pair_key(missing[j], max_length)] = (float(acc[row]), pre[row, :target_len[row]])
  results = []
  for chunk, ids, mask, target, target_len, new in tqdm(
      list(_gen_jobs(pairs, tokenizer, batch_size, max_length)),
      desc="scoring (generation)", unit="batch", disable=not progress, leave=False):
    post = _generate(generate_fn, ids, mask, new)
    post_acc = metrics.generation_accuracy(post, target, target_len)
    if pre_generate_fn is None:
      results.append((chunk, post_acc, None, None))
    elif cache is None:
      pre = _generate(pre_generate_fn, ids, mask, new)
      results.append((chunk, post_acc, metrics.generation_accuracy(pre, target, target_len),
                      metrics.generation_accuracy(post, pre, target_len)))
    else:
      pre = np.full(target.shape, -1, np.int32)
      pre_acc = np.full(target.shape[0], np.nan, np.float32)
      for row, j in enumerate(chunk):
        acc, tokens = cache.generated[_pair_key(pairs[j], max_length)]
        pre[row, :len(tokens)] = tokens
        pre_acc[row] = acc
      results.append((chunk, post_acc, pre_acc, metrics.generation_accuracy(post, pre, target_len)))
    inflight.settle(results)
  return _per_pair(results, len(pairs), pre_generate_fn is not None)


def _to_float(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else x


def _collect(per_record: list[dict[str, Any]], pairs: Sequence[PromptPair], values, key_for_kind: Mapping[str, str]):
  """Writes the per-pair `values` into per-record dicts (mean over a record's pairs of one kind)."""
  values = np.asarray(values, np.float64)
  record = np.fromiter((p.record for p in pairs), np.int64, len(pairs))
  kind = np.asarray([p.kind for p in pairs])
  for k, key in key_for_kind.items():
    sel = (kind == k) & ~np.isnan(values)
    count = np.bincount(record[sel], minlength=len(per_record))
    total = np.bincount(record[sel], weights=values[sel], minlength=len(per_record))
    for i in np.flatnonzero(count):
      per_record[i][key] = float(total[i] / count[i])


def _collect_pass(per_record, pairs, scores, keys: Mapping[str, tuple[str, str]], agree_key: str):
  """Writes one pass's per-pair (post, pre or None, agreement or None) into the per-record dicts:
  post and pre under `keys` (kind -> (post key, pre key)), the locality agreement under `agree_key`."""
  post, pre, agree = scores
  _collect(per_record, pairs, post, {k: v[0] for k, v in keys.items()})
  if pre is not None:
    _collect(per_record, pairs, pre, {k: v[1] for k, v in keys.items()})
    _collect(per_record, pairs, agree, {"loc": agree_key})


def _mean_over(per_record, key):
  vs = [r[key] for r in per_record if r.get(key) is not None]
  return (float(np.mean(vs)) if vs else None), len(vs)


def _overall(summary: dict[str, Any], prefix: str) -> None:
  """overall = mean(ES, GS, locality) of the summary means, naming the locality and the parts used."""
  es, gs = summary.get(f"{prefix}edit_acc"), summary.get(f"{prefix}rephrase_acc")
  loc_key = f"{prefix}loc_agree" if summary.get(f"{prefix}loc_agree") is not None else f"{prefix}loc_acc"
  loc = summary.get(loc_key)
  parts = {k: v for k, v in ((f"{prefix}edit_acc", es), (f"{prefix}rephrase_acc", gs), (loc_key, loc)) if v is not None}
  value = metrics.overall(*(np.nan if v is None else v for v in (es, gs, loc)))
  summary[f"{prefix}overall"] = _to_float(value)
  summary[f"{prefix}overall_locality"] = loc_key if loc is not None else None
  summary[f"{prefix}overall_of"] = sorted(parts)


def score_records(records: Sequence[EditRecord], tokenizer, post_logits_fn: LogitsFn,
                  pre_logits_fn: LogitsFn | None = None, *, batch_size: int = 64,
                  generate_fn: GenerateFn | None = None, pre_generate_fn: GenerateFn | None = None,
                  max_length: int | None = None, progress: bool = True,
                  pre_cache: PreCache | None = None) -> dict[str, Any]:
  """Scores records with the edited model (and the unedited one when given).

  Args:
    records: the edit records (their prompts, rephrases, unrelated prompts, portability pairs).
    tokenizer: a transformers tokenizer (the model's).
    post_logits_fn: right-padded EditBatch -> logits [B, T, V] of the edited model. A codebook editor
      takes its edit position from `batch.prompt_len - 1`.
    pre_logits_fn: the same for the unedited model; enables pre_* scores and loc_agree.
    batch_size: rows per call (short chunks are filled to this size, so shapes stay fixed).
    generate_fn: (left-padded prompt ids [B, T], mask [B, T], max_new_tokens) -> greedy tokens
      [B, >= max_new_tokens] of the edited model; enables gen_* scores.
    pre_generate_fn: the same for the unedited model; enables gen_loc_agree and pre_gen_*.
    max_length: the model's context limit; longer pairs lose their prompt start, with a warning.
    progress: show tqdm bars.
    pre_cache: a `PreCache` shared by calls that score the same unedited model (a sweep): each pair's
      pre-edit results are computed once. Scores are the same with or without it.

  Returns:
    {"summary": {...}, "records": [per-record dict, ...]} as described in the module docstring.
  """
  if not records:
    raise ValueError("no records to score")
  pairs = record_pairs(records)
  per_record: list[dict[str, Any]] = [
      {"index": i, "prompt": r.prompt, "target": r.target, **{k: None for k in _keys(
          r, pre_logits_fn is not None, generate_fn is not None, pre_generate_fn is not None)}}
      for i, r in enumerate(records)]

  scores = _teacher_forced(pairs, tokenizer, post_logits_fn, pre_logits_fn, batch_size, max_length,
                           progress, pre_cache)
  _collect_pass(per_record, pairs, scores, _TF_KEYS, "loc_agree")
  if generate_fn is not None:
    scores = _generation(pairs, tokenizer, generate_fn, pre_generate_fn, batch_size, max_length,
                         progress, pre_cache)
    _collect_pass(per_record, pairs, scores, _GEN_KEYS, "gen_loc_agree")

  return {"summary": summarize(per_record), "records": per_record}


_NOT_METRICS = ("index", "prompt", "target")
# Whole-answer companions of the token-mean scores: the share of records whose every target token is
# predicted. Token-mean ES gives partial credit (the reference metric); on multi-token names whose
# continuation follows from the first token, `edit_exact` shows how many edits really took.
_EXACT_OF = ("edit_acc", "rephrase_acc", "pre_edit_acc", "pre_rephrase_acc")


def summarize(per_record: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Summary of per-record score dicts: the mean of each metric over the records that have it,
  `counts`, `overall` (and `gen_overall` when generation scores exist) with the locality named.

  Args:
    per_record: dicts as in `score_records(...)["records"]` (any subset, e.g. the first n edits).

  Returns:
    The summary dict.
  """
  keys: list[str] = []
  for r in per_record:
    keys += [k for k in r if k not in keys and k not in _NOT_METRICS]
  summary: dict[str, Any] = {"n_records": len(per_record)}
  counts = {}
  for key in keys:
    summary[key], counts[key] = _mean_over(per_record, key)
  for key in _EXACT_OF:
    if key in keys:
      whole = [r[key] >= 1.0 for r in per_record if r.get(key) is not None]
      name = key.replace("_acc", "_exact")
      summary[name], counts[name] = (float(np.mean(whole)) if whole else None), len(whole)
  _overall(summary, "")
  if any(k.startswith("gen_") for k in keys):
    _overall(summary, "gen_")
  summary["counts"] = counts
  return summary


def _keys(r: EditRecord, pre: bool, gen: bool, pre_gen: bool) -> list[str]:
  """The metric keys a record gets (all present, None until scored)."""
  kinds = ["edit"] + (["rephrase"] if r.rephrase else []) + (["loc"] if r.loc_prompt else []) + (
      ["port"] if r.portability else [])

  def pass_keys(table, with_pre: bool, agree_key: str) -> list[str]:
    out = []
    for kind in kinds:
      out += [table[kind][0]] + ([table[kind][1]] if with_pre else [])
      out += [agree_key] if kind == "loc" and with_pre else []
    return out

  return pass_keys(_TF_KEYS, pre, "loc_agree") + (
      pass_keys(_GEN_KEYS, pre_gen, "gen_loc_agree") if gen else [])


def json_safe(obj):
  """NaN/inf -> None so the JSON is strict."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return json_safe(obj.item())
  return obj


def write_metrics(path: str | os.PathLike, method: str, n_edits: int, scores: Mapping[str, Any],
                  extra: Mapping[str, Any] | None = None) -> None:
  """Writes {"method", "n_edits", "summary", "records", **extra} atomically as strict JSON.

  Args:
    path: output file (metrics.json).
    method: editor name.
    n_edits: number of edits applied.
    scores: `score_records` output.
    extra: more top-level fields (timings, settings); cannot replace the four core keys.
  """
  obj = dict(extra or {})
  obj.update({"method": method, "n_edits": int(n_edits), "summary": scores["summary"],
              "records": scores["records"]})
  atomic_write_json(path, json_safe(obj))
