"""Edit-record loaders: ZsRE (MEND), CounterFact (EasyEdit and ROME), WikiBigEdit, and a generic format.

Files are read through the `datasets` library (`load_dataset("json", data_files=...)`), which takes a
JSON list file and JSON Lines alike (LF or CRLF); `hf:owner/name` (optionally `hf:owner/name:split`)
loads a Hub dataset through the same path. Each raw row is then checked and mapped to an `EditRecord`
by the format's converter; the first problem raises `UserError` naming the file, the record index
(0-based, file order) and the field, or, with `skip_invalid`, is reported on stderr and skipped.

Field mapping (each dataset's own field names -> EditRecord):
  zsre            src -> prompt, alt (else ans) -> target, rephrase, loc + "?" -> loc_prompt,
                  loc_ans -> loc_answer, answers[0] -> ground_truth, optional portability.
  counterfact     prompt, target_new -> target (never ground_truth), ground_truth, rephrase_prompt,
                  locality_prompt, locality_ground_truth.
  counterfact_rome  requested_rewrite.prompt.format(subject) -> prompt, target_new.str -> target,
                  target_true.str -> ground_truth and loc_answer, paraphrase_prompts[0] -> rephrase,
                  neighborhood_prompts[0] -> loc_prompt (all of them kept in `extra`).
  wikibigedit     update -> prompt, ans -> target, rephrase, loc (+ "?" unless it ends with one) ->
                  loc_prompt, loc_ans, personas / mhop (+ mhop_ans) -> portability pairs.
  generic         prompt, target, optional rephrase, loc_prompt, loc_answer, ground_truth, portability.
  unke            question -> prompt, answer -> target (long free text), para_question -> rephrase,
                  sub_question[i] / sub_answer[i] -> portability pairs; extra["format"] = "unke"
                  (prompts, tokenization and scoring in `horse_jax.data.unke`, `horse_jax.eval.unke`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

from horse_jax.data.records import EditRecord
from horse_jax.errors import UserError

FORMATS = ("zsre", "counterfact", "counterfact_rome", "wikibigedit", "generic", "unke")
ALIASES = {
    "mend": "zsre", "zsre_mend": "zsre", "easyedit": "counterfact", "counterfact_easyedit": "counterfact",
    "cf": "counterfact", "rome": "counterfact_rome", "wiki_big_edit": "wikibigedit", "wbe": "wikibigedit",
    "unstructured": "unke",
}


class RecordError(Exception):
  """A problem with one raw record: `field` names the offending field (None: the record itself)."""

  def __init__(self, field: str | None, message: str):
    super().__init__(message)
    self.field = field
    self.message = message


# --------------------------------------------------------------------------------------------------
# Field access with precise errors.


def _get(row: Mapping[str, Any], field: str, *, required: bool = True) -> Any:
  value = row.get(field)
  if value is None and required:
    raise RecordError(field, f"missing field {field!r}")
  return value


def _text(row: Mapping[str, Any], field: str, *, required: bool = True, what: str = "") -> str | None:
  """A non-empty string field (None if optional and absent)."""
  value = _get(row, field, required=required)
  if value is None:
    return None
  if not isinstance(value, str):
    raise RecordError(field, f"field {field!r} should be a string, got {type(value).__name__}")
  if not value.strip():
    raise RecordError(field, f"field {field!r} is empty{what}")
  return value


def _sub(row: Mapping[str, Any], field: str) -> Mapping[str, Any]:
  value = _get(row, field)
  if not isinstance(value, Mapping):
    raise RecordError(field, f"field {field!r} should be an object, got {type(value).__name__}")
  return value


def _nested_text(row: Mapping[str, Any], path: str, what: str = "") -> str:
  """A string at a dotted path ('requested_rewrite.target_new.str'), errors naming the full path."""
  parts = path.split(".")
  node: Any = row
  for depth, part in enumerate(parts[:-1]):
    where = ".".join(parts[:depth + 1])
    if not isinstance(node, Mapping):
      raise RecordError(where, f"field {'.'.join(parts[:depth]) or part!r} should be an object")
    node = node.get(part)
    if node is None:
      raise RecordError(where, f"missing field {where!r}")
    if not isinstance(node, Mapping):
      raise RecordError(where, f"field {where!r} should be an object, got {type(node).__name__}")
  value = node.get(parts[-1])
  if value is None:
    raise RecordError(path, f"missing field {path!r}")
  if not isinstance(value, str):
    raise RecordError(path, f"field {path!r} should be a string, got {type(value).__name__}")
  if not value.strip():
    raise RecordError(path, f"field {path!r} is empty{what}")
  return value


def _text_list(row: Mapping[str, Any], field: str) -> list[str]:
  """An optional list of prompts; items may be strings or {"prompt": ...} objects."""
  value = _get(row, field, required=False)
  if value is None:
    return []
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise RecordError(field, f"field {field!r} should be a list, got {type(value).__name__}")
  out = []
  for i, item in enumerate(value):
    if isinstance(item, Mapping):
      item = item.get("prompt")
    if not isinstance(item, str) or not item.strip():
      raise RecordError(f"{field}[{i}]", f"field {field}[{i}] should be a non-empty string")
    out.append(item)
  return out


def _loc_pair(row: Mapping[str, Any], prompt_field: str, answer_field: str,
              suffix: Callable[[str], str] = lambda s: s) -> tuple[str | None, str | None]:
  """(loc_prompt, loc_answer): both or neither."""
  prompt = _text(row, prompt_field, required=False)
  answer = _text(row, answer_field, required=prompt is not None)
  if prompt is None and answer is not None:
    raise RecordError(prompt_field, f"missing field {prompt_field!r} (field {answer_field!r} is set)")
  return (suffix(prompt) if prompt is not None else None), answer


def _portability(row: Mapping[str, Any], field: str = "portability") -> tuple[tuple[str, str], ...]:
  """Optional (prompt, answer) pairs from a list of [p, a] / {"prompt","answer"} /
  EasyEdit {"New Question","New Answer"} items, or one such object."""
  value = _get(row, field, required=False)
  if value is None:
    return ()
  items = value if isinstance(value, (list, tuple)) else [value]
  pairs = []
  for i, item in enumerate(items):
    where = f"{field}[{i}]"
    if isinstance(item, Mapping):
      prompt = item.get("prompt", item.get("New Question"))
      answer = item.get("answer", item.get("ground_truth", item.get("New Answer")))
    elif isinstance(item, (list, tuple)) and len(item) == 2:
      prompt, answer = item
    else:
      raise RecordError(where, f"field {where} should be a [prompt, answer] pair or an object")
    if isinstance(answer, (list, tuple)) and answer:
      answer = answer[0]  # EasyEdit keeps a list of acceptable answers; score the first
    if not isinstance(prompt, str) or not prompt.strip():
      raise RecordError(where, f"field {where} has no prompt string")
    if not isinstance(answer, str) or not answer.strip():
      raise RecordError(where, f"field {where} has no answer string")
    pairs.append((prompt, answer))
  return tuple(pairs)


def _first_answer(row: Mapping[str, Any], field: str) -> str | None:
  value = row.get(field)
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return value if isinstance(value, str) and value.strip() else None


def _extra(row: Mapping[str, Any], used: Iterable[str]) -> dict[str, Any]:
  used = set(used)
  return {k: v for k, v in row.items() if k not in used and v is not None}


# --------------------------------------------------------------------------------------------------
# One converter per format: raw row -> EditRecord (raises RecordError).


def _from_zsre(row: Mapping[str, Any]) -> EditRecord:
  prompt = _text(row, "src")
  # `alt` is the new target; some MEND dumps name it `ans`. A record with neither misses `alt`.
  target_field = "ans" if row.get("alt") is None and row.get("ans") is not None else "alt"
  target = _text(row, target_field, what=" (the new target)")
  loc_prompt, loc_answer = _loc_pair(row, "loc", "loc_ans", lambda s: s + "?")
  return EditRecord(
      prompt=prompt, target=target, rephrase=_text(row, "rephrase", required=False),
      loc_prompt=loc_prompt, loc_answer=loc_answer, ground_truth=_first_answer(row, "answers"),
      portability=_portability(row),
      extra=_extra(row, ("src", "alt", "ans", "rephrase", "loc", "loc_ans", "portability")))


def _from_counterfact(row: Mapping[str, Any]) -> EditRecord:
  # target_new is the counterfactual; the HORSE reference's use of ground_truth here is a bug.
  target = row.get("target_new")
  if isinstance(target, Mapping):  # some EasyEdit dumps keep ROME's {"str": ...}
    target = _nested_text(row, "target_new.str", " (the new target)")
  else:
    target = _text(row, "target_new", what=" (the new target)")
  loc_prompt, loc_answer = _loc_pair(row, "locality_prompt", "locality_ground_truth")
  return EditRecord(
      prompt=_text(row, "prompt"), target=target, rephrase=_text(row, "rephrase_prompt", required=False),
      loc_prompt=loc_prompt, loc_answer=loc_answer, ground_truth=_first_answer(row, "ground_truth"),
      portability=_portability(row),
      extra=_extra(row, ("prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                         "locality_ground_truth", "portability")))


def _from_counterfact_rome(row: Mapping[str, Any]) -> EditRecord:
  rewrite = _sub(row, "requested_rewrite")
  template = _nested_text(row, "requested_rewrite.prompt")
  subject = _nested_text(row, "requested_rewrite.subject")
  if "{}" not in template:
    raise RecordError("requested_rewrite.prompt", "field 'requested_rewrite.prompt' has no '{}' for the subject")
  target = _nested_text(row, "requested_rewrite.target_new.str", " (the new target)")
  truth = _nested_text(row, "requested_rewrite.target_true.str")
  paraphrases = _text_list(row, "paraphrase_prompts")
  neighbours = _text_list(row, "neighborhood_prompts")
  del rewrite
  return EditRecord(
      prompt=template.replace("{}", subject), target=target,
      rephrase=paraphrases[0] if paraphrases else None,
      loc_prompt=neighbours[0] if neighbours else None, loc_answer=truth if neighbours else None,
      ground_truth=truth,
      extra=_extra(row, ("requested_rewrite",)) | {"subject": subject})


def _from_wikibigedit(row: Mapping[str, Any]) -> EditRecord:
  target = _text(row, "ans", what=" (the new target)")
  loc_prompt, loc_answer = _loc_pair(row, "loc", "loc_ans", lambda s: s if s.rstrip().endswith("?") else s + "?")
  pairs = []
  persona = _text(row, "personas", required=False)
  if persona is not None:
    pairs.append((persona, target))
  mhop = _text(row, "mhop", required=False)
  if mhop is not None:
    pairs.append((mhop, _text(row, "mhop_ans")))
  return EditRecord(
      prompt=_text(row, "update"), target=target, rephrase=_text(row, "rephrase", required=False),
      loc_prompt=loc_prompt, loc_answer=loc_answer, portability=tuple(pairs),
      extra=_extra(row, ("update", "ans", "rephrase", "loc", "loc_ans", "personas", "mhop", "mhop_ans")))


def _from_generic(row: Mapping[str, Any]) -> EditRecord:
  loc_prompt, loc_answer = _loc_pair(row, "loc_prompt", "loc_answer")
  return EditRecord(
      prompt=_text(row, "prompt"), target=_text(row, "target", what=" (the new target)"),
      rephrase=_text(row, "rephrase", required=False), loc_prompt=loc_prompt, loc_answer=loc_answer,
      ground_truth=_first_answer(row, "ground_truth"), portability=_portability(row),
      extra=_extra(row, ("prompt", "target", "rephrase", "loc_prompt", "loc_answer", "ground_truth",
                         "portability")))


def _from_unke(row: Mapping[str, Any]) -> EditRecord:
  """UnKE unstructured edit: a question with a long free-text answer, its paraphrase and
  sub-questions with their own answers (both lists, equally long)."""
  questions = _text_list(row, "sub_question")
  answers = _get(row, "sub_answer", required=bool(questions))
  answers = [] if answers is None else answers
  if isinstance(answers, str):
    answers = [answers]
  if not isinstance(answers, (list, tuple)):
    raise RecordError("sub_answer", f"field 'sub_answer' should be a list, got {type(answers).__name__}")
  if len(answers) != len(questions):
    raise RecordError("sub_answer", f"field 'sub_answer' has {len(answers)} item(s) but 'sub_question' "
                      f"has {len(questions)}")
  for i, answer in enumerate(answers):
    if not isinstance(answer, str) or not answer.strip():
      raise RecordError(f"sub_answer[{i}]", f"field sub_answer[{i}] should be a non-empty string")
  return EditRecord(
      prompt=_text(row, "question"), target=_text(row, "answer", what=" (the new answer)"),
      rephrase=_text(row, "para_question", required=False),
      portability=tuple(zip(questions, answers)),
      extra=_extra(row, ("question", "answer", "para_question", "sub_question", "sub_answer"))
      | {"format": "unke"})


CONVERTERS: dict[str, Callable[[Mapping[str, Any]], EditRecord]] = {
    "zsre": _from_zsre,
    "counterfact": _from_counterfact,
    "counterfact_rome": _from_counterfact_rome,
    "wikibigedit": _from_wikibigedit,
    "generic": _from_generic,
    "unke": _from_unke,
}


def detect_format(row: Mapping[str, Any]) -> str | None:
  """The format whose characteristic fields `row` has (None if none fits)."""
  keys = {k for k, v in row.items() if v is not None}
  if "requested_rewrite" in keys:
    return "counterfact_rome"
  if "update" in keys:
    return "wikibigedit"
  if "src" in keys:
    return "zsre"
  if "target_new" in keys:
    return "counterfact"
  if "prompt" in keys and "target" in keys:
    return "generic"
  if "question" in keys and "answer" in keys:
    return "unke"
  return None


# --------------------------------------------------------------------------------------------------
# Reading raw rows.


def _json_error(path: str) -> str | None:
  """Why the file is not JSON / JSON Lines (None if it parses), with a line number."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as err:
    return f"not UTF-8 text ({err.reason} at byte {err.start})"
  stripped = text.lstrip()
  if not stripped:
    return "empty file"
  if stripped[0] == "[":
    try:
      json.loads(text)
      return None
    except json.JSONDecodeError as err:
      return f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      json.loads(line)
    except json.JSONDecodeError as err:
      return f"not valid JSON Lines (line {lineno}, column {err.colno}: {err.msg})"
  return None


def _python_rows(path: str) -> list[Any]:
  """Rows parsed with the json module (fallback when Arrow cannot unify the columns)."""
  with open(path, encoding="utf-8-sig") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def _quiet_datasets():
  import datasets  # noqa: PLC0415  (heavy import, only when loading)
  was_enabled = datasets.is_progress_bar_enabled()
  level = datasets.logging.get_verbosity()
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  logging.getLogger("datasets").setLevel(logging.ERROR)
  try:
    yield datasets
  finally:
    datasets.logging.set_verbosity(level)
    if was_enabled:
      datasets.enable_progress_bars()


def read_rows(path: str) -> list[Any]:
  """Raw rows (dicts, in file order) of a local JSON/JSONL file or an `hf:` Hub dataset.

  Args:
    path: a .json (list of objects) or .jsonl file, or `hf:owner/name[:split]`.

  Returns:
    The rows. Raises UserError if the file is missing or not JSON.
  """
  with _quiet_datasets() as datasets:
    if path.startswith("hf:"):
      name, _, split = path[3:].partition(":")
      try:
        return datasets.load_dataset(name, split=split or "train").to_list()
      except Exception as err:  # noqa: BLE001  (any hub/network failure is the user's to fix)
        raise UserError(f"{path}: cannot load Hub dataset ({str(err).splitlines()[0]})") from None
    if not os.path.exists(path):
      raise UserError(f"{path}: file not found")
    if os.path.isdir(path):
      raise UserError(f"{path}: is a folder, expected a JSON or JSON Lines file")
    problem = _json_error(path)
    if problem is not None:
      raise UserError(f"{path}: {problem}")
    # A private cache: a local file re-converted every time never serves stale rows after an edit.
    with tempfile.TemporaryDirectory(prefix="horse-jax-ds-") as cache:
      try:
        ds = datasets.load_dataset("json", data_files=os.path.abspath(path), split="train", cache_dir=cache)
        rows = ds.to_list()
      except Exception:  # noqa: BLE001  Arrow could not unify the columns: read plainly, then validate
        rows = _python_rows(path)
  if isinstance(rows, dict):
    rows = [rows]
  return rows


# --------------------------------------------------------------------------------------------------
# Public entry points.


def normalize_format(fmt: str) -> str:
  name = ALIASES.get(fmt.lower(), fmt.lower())
  if name != "auto" and name not in FORMATS:
    raise UserError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
  return name


def convert_rows(rows: Sequence[Any], path: str = "<rows>", fmt: str = "auto", skip_invalid: bool = False,
                 limit: int | None = None) -> tuple[list[EditRecord], list[str]]:
  """Checks and converts raw rows; returns (records, one message per skipped record).

  The format is detected from the first row when `fmt="auto"`; every later row must fit it, so a
  row missing a field is reported as exactly that. `limit` keeps the first N valid records.
  """
  fmt = normalize_format(fmt)
  records: list[EditRecord] = []
  skipped: list[str] = []
  if not rows:
    raise UserError(f"{path}: no records")
  for index, row in enumerate(rows):
    if limit is not None and len(records) >= limit:
      break
    try:
      if not isinstance(row, Mapping):
        raise RecordError(None, f"should be a JSON object, got {type(row).__name__}")
      if fmt == "auto":
        found = detect_format(row)
        if found is None:
          fields = ", ".join(sorted(str(k) for k, v in row.items() if v is not None)) or "none"
          raise UserError(f"{path}: record {index}: unknown format (fields: {fields}); expected ZsRE "
                          "(src, alt), CounterFact (prompt, target_new), ROME CounterFact "
                          "(requested_rewrite), WikiBigEdit (update, ans), generic (prompt, target) or UnKE "
                          "(question, answer)")
        fmt = found
      records.append(CONVERTERS[fmt](row))
    except RecordError as err:
      message = f"{path}: record {index}: {err.message}"
      if not skip_invalid:
        raise UserError(message) from None
      skipped.append(message)
  if not records:
    raise UserError(f"{path}: no valid records" + (f" ({len(skipped)} skipped)" if skipped else ""))
  return records, skipped


def load_records(path: str | os.PathLike, fmt: str = "auto", skip_invalid: bool = False,
                 limit: int | None = None) -> list[EditRecord]:
  """Loads edit records from a file in any supported format.

  Args:
    path: JSON list or JSON Lines file (LF or CRLF), or `hf:owner/name[:split]`.
    fmt: "auto" (detect from fields) or one of FORMATS (aliases: mend, easyedit, rome, ...).
    skip_invalid: report each malformed record as one line on stderr and skip it, instead of
      raising UserError at the first one.
    limit: keep the first N valid records in file order (None: all).

  Returns:
    The EditRecords, in file order.
  """
  path = os.fspath(path)
  if limit is not None and limit < 1:
    raise UserError(f"limit (the number of records to keep) must be at least 1, got {limit}")
  records, skipped = convert_rows(read_rows(path), path, fmt, skip_invalid, limit)
  for message in skipped:
    print(f"skipped {message}", file=sys.stderr)
  if skipped:
    print(f"{path}: skipped {len(skipped)} invalid record(s), kept {len(records)}", file=sys.stderr)
  return records
