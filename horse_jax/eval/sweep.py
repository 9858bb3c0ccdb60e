"""Evaluation sweeps: models x datasets x methods x numbers of edits x seeds -> tables and plots.

A sweep YAML (see `eval/*.yaml` and DEFAULTS) names the models and datasets, the methods (entries of
`horse_jax.eval.methods`), the numbers of edits and the seeds. For each seed the records are shuffled
(`sample: random`, or kept in file order with `sample: first`) and the first n are edited:
  batch methods (horse, malmen, mend, unedited): one cell per n, all n edits at once, timing "at_once";
  sequential methods (horen, grace, ultraedit, rome, memit, alphaedit, wise, defer; horse, malmen,
    mend with `sequential_step`: steps of that many edits): one run over max(n) edits per seed; at
    each checkpoint n every edit so far is scored on the current model (timing "final"), and each
    edit is scored right after it is made (timing "immediate", summarized over the first n edits).
Outputs in the output folder: results.json (every cell, then mean/std over seeds), results.md (one
markdown table per model/dataset), table.md (a paper's layout: methods x numbers of edits x ES, GS,
locality, overall), curve.jsonl (one line per finished (model, data, method, seed, n_edits),
appended as each finishes), plots/*.png (metric vs number of edits, error bars over seeds),
curves/*.png (the same curves, seeds as bands) and per-cell metrics files under cells/ (written with
`write_metrics`). Every file is written atomically (curve.jsonl line by line).
`eval.score_sample` scores a seeded random sample of the edits of a large cell (`scored_indices`),
named in its line and cell. Resume: sweep.json holds the settings; a re-run over the same folder
with the same settings keeps the lines of curve.jsonl, skips their cells and continues each
sequential stream from the state saved at its last finished checkpoint (streams/, per method
`SequentialMethod.save` / `load`; removed when the sweep completes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from horse_jax import progress as progress_lib
from horse_jax import settings as settings_lib
from horse_jax.data import unke
from horse_jax.errors import UserError
from horse_jax.eval import methods as methods_lib
from horse_jax.eval import plots, tables
from horse_jax.eval import unke as unke_eval
from horse_jax.eval.scoring import PreCache, json_safe, score_records, summarize, write_metrics
from horse_jax.io import atomic_write_json, atomic_write_text
from horse_jax.typed_config import Settings, setting

@dataclasses.dataclass(frozen=True)
class SweepEval(Settings):
  """`eval.*` of a sweep."""

  mode: Literal["teacher", "generate"] = setting(
      "teacher", "teacher-forced scores only, or also greedy generation (teacher is always computed)")
  batch_size: int = setting(64, "scoring batch size", minimum=1)
  immediate_batch_size: int = setting(4, "batch size of the per-edit scores of sequential methods",
                                      minimum=1)
  max_length: int | None = setting(None, "longest scored sequence; None = the model's "
                                         "max_position_embeddings", minimum=1)
  immediate: bool = setting(True, "sequential methods: also score each edit right after it is made")
  score_sample: int | None = setting(
      None, "score a seeded random sample of this many edits in a cell of more edits (a sequential "
            "checkpoint's edits so far, or a batch method's edits): large-N curves at a fixed "
            "scoring cost; None = score every edit", minimum=1)
  save_cells: bool = setting(True, "per-cell metrics files with per-record scores")
  max_new_tokens: int = setting(512, "UnKE data: greedy generation budget per prompt (cut to the "
                                     "context)", minimum=1)


@dataclasses.dataclass(frozen=True)
class SweepSettings(Settings):
  """A sweep: models x datasets x methods x numbers of edits x seeds (a YAML of these keys)."""

  name: str = setting("sweep", "name of the sweep (results folder and tables)")
  model: tuple[str, ...] | None = setting(None, "HF checkpoint folder(s)")
  tokenizer: str | None = setting(None, "tokenizer folder; None = each model's folder")
  data: tuple[str, ...] | None = setting(None, "edit records file(s)")
  format: str = setting("auto", "record format of the data files (see `horse_jax.data.loaders`)")
  skip_invalid: bool = setting(False, "report and skip malformed records")
  dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "LM compute dtype")
  n_edits: tuple[int, ...] = setting((1, 10, 100), "numbers of edits", minimum=1)
  seeds: tuple[int, ...] = setting((0,), "seeds (each draws its own records)")
  sample: Literal["random", "first"] = setting(
      "random", "records per seed: a seeded shuffle (random) or file order (first)")
  methods: tuple[Any, ...] = setting(
      ("unedited",), "method names, or mappings {name, label, hypernet, stats_corpus, sequential_step, "
      "n_edits, settings: {model, data, editor, eval}} (settings as in `horse-jax settings --method "
      "NAME`; stats_corpus: ROME/MEMIT/AlphaEdit's statistics corpus; sequential_step: HORSE/MALMEN/"
      "MEND edit as a sequential stream of steps of that many requests)")
  eval: SweepEval = SweepEval()


# The default sweep tree (the one definition is SweepSettings).
DEFAULTS: dict[str, Any] = dataclasses.asdict(SweepSettings())


def _as_list(value, what: str) -> list:
  if value is None:
    raise UserError(f"sweep: `{what}` is not set")
  return list(value) if isinstance(value, (list, tuple)) else [value]


def _method_entries(settings) -> list[dict[str, Any]]:
  out = []
  for i, entry in enumerate(_as_list(settings["methods"], "methods")):
    if isinstance(entry, str):
      entry = {"name": entry}
    if not isinstance(entry, Mapping) or "name" not in entry:
      raise UserError(f"sweep: methods[{i}] should be a method name or a mapping with `name`")
    entry = dict(entry)
    entry.setdefault("label", entry["name"])
    methods_lib.entry_kind(entry)  # unknown names (and a misplaced sequential_step) fail before any work
    hypernet = entry.get("hypernet")
    if hypernet and hypernet != methods_lib.FRESH_HYPERNET and not os.path.exists(str(hypernet)):
      raise UserError(f"sweep: methods[{i}] ({entry['label']}): hypernet folder {hypernet!r} not found")
    out.append(entry)
  labels = [e["label"] for e in out]
  if len(set(labels)) != len(labels):
    raise UserError(f"sweep: method labels must be unique (set `label`), got {labels}")
  return out


def _counts(value, where: str) -> list[int]:
  counts = sorted({int(n) for n in _as_list(value, where)})
  if not counts or counts[0] < 1:
    raise UserError(f"sweep: {where} must be positive integers")
  return counts


def slug(text: str) -> str:
  """A file-name-safe short form of a path or label."""
  base = os.path.basename(os.path.normpath(str(text))) or str(text)
  return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "x"


def order_for(n_records: int, seed: int, sample: str) -> np.ndarray:
  """Record order for a seed: a seeded permutation, or file order."""
  if sample == "first":
    return np.arange(n_records)
  if sample != "random":
    raise UserError(f"sweep: sample must be 'random' or 'first', not {sample!r}")
  return np.random.default_rng(seed).permutation(n_records)


# ---- the models of a sweep ----


def _load_model(path: str, settings, mesh=None, fsdp: bool = False):
  from horse_jax import runtime  # noqa: PLC0415
  if settings["dtype"] not in ("float32", "bfloat16", "float16"):
    raise UserError("sweep: dtype must be one of float32, bfloat16, float16")
  return runtime.load_model(path, dtype=settings["dtype"], mesh=mesh, fsdp=fsdp,
                            tokenizer_path=settings["tokenizer"])


# ---- the sweep ----


def run_sweep(settings: Mapping[str, Any], out: str, *, progress: bool = True,
              loaded: Mapping[str, tuple[Any, Any]] | None = None, write: bool = True, mesh=None,
              fsdp: bool = False, resume: bool = True) -> dict[str, Any]:
  """Runs every cell of a sweep and writes results.json, results.md, plots/ and cells/ under `out`.

  Args:
    settings: resolved sweep settings (DEFAULTS merged with the YAML and --set overrides).
    out: output folder.
    progress: show tqdm bars.
    loaded: optional {model path: (Model, tokenizer)} already in memory (tests, notebooks).
    write: write the files and print notes (multi-host: process 0 only; the others compute alike).
    mesh: the (data, model) mesh models are loaded onto and edited on
      (`meshes.device_mesh`); None: one device.
    fsdp: with a mesh, also split the weights over `data`.
    resume: keep the finished cells of an earlier run of this sweep in `out` (its curve.jsonl and
      streams/; a folder holding another sweep is refused); False: `out` is new (multi-host workers
      of an --overwrite run, whose `out` still holds the old sweep).

  Returns:
    The results dict that was written to results.json.
  """
  from horse_jax.data.loaders import load_records  # noqa: PLC0415
  model_paths = [str(p) for p in _as_list(settings["model"], "model")]
  data_paths = [str(p) for p in _as_list(settings["data"], "data")]
  entries = _method_entries(settings)
  n_edits = _counts(settings["n_edits"], "n_edits")
  seeds = [int(s) for s in _as_list(settings["seeds"], "seeds")]
  ev = settings["eval"]
  if ev["mode"] not in ("teacher", "generate"):
    raise UserError(f"sweep: eval.mode must be teacher or generate, not {ev['mode']!r}")
  datasets = {p: load_records(p, fmt=settings["format"], skip_invalid=bool(settings["skip_invalid"]))
              for p in data_paths}  # every dataset is checked before any model work
  for path, records in datasets.items():
    hypernet = [e["label"] for e in entries
                if methods_lib.kind_of(e["name"]) != "sequential" and e["name"] != "unedited"]
    if unke.is_unke(records[0]) and hypernet:
      raise UserError(f"sweep: {path} holds UnKE (unstructured) records, edited by horen, grace "
                      f"(or scored unedited), not by {', '.join(hypernet)}")
  for entry in entries:  # checked after the data, whose format may rule the method out first
    if entry["name"] in settings_lib.HYPERNET and not entry.get("hypernet"):
      raise UserError(f"sweep: methods ({entry['label']}): {entry['name']} needs `hypernet:` a trained "
                      "hypernetwork folder (`horse-jax train ... --out RUN` writes RUN/hypernet) or "
                      "`init` for a freshly initialised, untrained one")
  if write:
    os.makedirs(out, exist_ok=True)
    claim(out, settings)
  store = Store(out, write, read=resume)  # finished cells of an earlier, interrupted run of this sweep are kept
  if store.lines and write:
    progress_lib.log(f"sweep {settings['name']}: resuming ({len(store.lines)} finished cell(s) kept)")
  results: dict[str, Any] = {"name": settings["name"], "settings": _plain(settings), "complete": False,
                             "cells": store.cells(), "skipped": [], "aggregate": [],
                             "effective_settings": []}
  from horse_jax import runtime  # noqa: PLC0415
  make_logits = runtime.logits_fn
  make_generate = runtime.generate_fn if ev["mode"] == "generate" else None

  for model_path in model_paths:
    if loaded and model_path in loaded:
      model, tokenizer = loaded[model_path]
    else:
      model, tokenizer = _load_model(model_path, settings, mesh, fsdp)
    max_length = ev["max_length"] or getattr(model.config, "max_position_embeddings", None)
    pre_logits = make_logits(model)
    pre_generate = make_generate(model) if make_generate else None
    pre_cache = PreCache()  # the unedited model's results per pair, shared by every cell of this model
    unke_pre_cache: dict = {}  # the same for UnKE prompts

    def score(records, post_logits_fn, post_generate_fn=None, batch_size=None):
      if records and unke.is_unke(records[0]):  # unstructured edits: generation + text metrics
        return unke_eval.score_unke(
            records, tokenizer, post_generate_fn if make_generate else None, pre_generate,
            logits_fn=post_logits_fn, pre_logits_fn=pre_logits,
            max_new_tokens=int(ev["max_new_tokens"]), batch_size=int(batch_size or ev["batch_size"]),
            max_length=max_length, progress=progress, pre_cache=unke_pre_cache)
      return score_records(records, tokenizer, post_logits_fn, pre_logits,
                           batch_size=int(batch_size or ev["batch_size"]),
                           generate_fn=post_generate_fn if make_generate else None,
                           pre_generate_fn=pre_generate, max_length=max_length, progress=progress,
                           pre_cache=pre_cache)

    ctx = methods_lib.CellContext(model=model, tokenizer=tokenizer, score=score, logits_fn=make_logits,
                                  generate_fn=make_generate, model_path=model_path, progress=progress,
                                  mesh=mesh)
    for entry in entries:  # resolved as `horse-jax edit` resolves them; editor.seed is the first seed's
      eff = methods_lib.effective_settings(ctx, entry, seeds[0])
      if eff is not None:
        results["effective_settings"].append({"model": model_path, "method": entry["label"], "settings": eff})
    for data_path, records in datasets.items():
      group = {"model": model_path, "data": data_path}
      for note in _skipped(entries, n_edits, records, data_path):
        if write:
          print(f"sweep: skipped {note}", file=sys.stderr)
        results["skipped"].append(note)
      for entry in entries:
        usable = _usable(entry, n_edits, records)
        if not usable:
          continue
        for seed in tqdm(seeds, desc=f"{entry['label']} seeds", disable=not progress or len(seeds) < 2):
          key = (model_path, data_path, entry["label"], seed)
          if store.finished(key) >= set(usable):
            continue

          def emit(cells, seed=seed):
            """One finished (method, seed, n): its cells' files, then its curve.jsonl line."""
            for cell in cells:
              cell.update(group)
              if ev["save_cells"] and write:
                _save_cell(out, cell)
              cell.pop("scores", None)
              if write and not progress:  # no bars (not a terminal, or --quiet): one line per cell
                progress_lib.log(f"sweep cell {entry['label']} n={cell.get('n_edits')} seed={seed} "
                                 f"{cell.get('timing', '')}: {cell.get('seconds', 0.0):.1f} s")
            store.append(cells)
            results["cells"] = store.cells()
            if write:
              atomic_write_json(os.path.join(out, "results.json"), json_safe(results))  # partial progress

          order = order_for(len(records), seed, settings["sample"])
          if methods_lib.entry_kind(entry) == "batch":
            _run_batch(ctx, entry, records, order, usable, seed, ev, progress, store.finished(key), emit)
          else:
            _run_sequential(ctx, entry, records, order, usable, seed, ev, progress,
                            store.stream(key), emit)
  results["cells"] = store.cells()
  results["aggregate"] = tables.aggregate(results["cells"])
  results["complete"] = True
  if not write:
    results["plots"] = []
    return results
  _write_tables(results, out)
  shutil.rmtree(os.path.join(out, STREAMS), ignore_errors=True)  # resume state: a finished sweep needs none
  return results


def _write_tables(results: dict[str, Any], out: str) -> None:
  """plots/, curves/, results.md, table.md and results.json of `results` (aggregated) in `out`."""
  results["plots"] = [os.path.relpath(p, out) for p in plots.plot_sweep(results["aggregate"], os.path.join(out, "plots"))]
  results["curves"] = [os.path.relpath(p, out) for p in plots.plot_curves(results["cells"], os.path.join(out, "curves"))]
  atomic_write_text(os.path.join(out, "results.md"), tables.markdown(results))
  atomic_write_text(os.path.join(out, "table.md"), tables.paper_table(results))
  atomic_write_json(os.path.join(out, "results.json"), json_safe(results))


def report(settings: Mapping[str, Any], out: str) -> dict[str, Any]:
  """Tables and plots of the finished cells of a stopped (or still running) sweep, without editing:
  results.md, plots/ and curves/ from `out`'s curve.jsonl, and results.json marked incomplete
  (`complete: false`). The same command without --report resumes the sweep.

  Args:
    settings: the sweep's resolved settings (the folder must hold this sweep).
    out: the sweep folder.

  Returns:
    The results dict written to results.json.
  """
  if folder_holds(out, settings) is not True:
    raise UserError(f"--report: {out} holds no run of this sweep (its sweep.json has other settings, "
                    "or it is missing)")
  store = Store(out, write=False)
  if not store.lines:
    raise UserError(f"--report: {out} has no finished cell yet ({CURVE} is empty)")
  results: dict[str, Any] = {"name": settings["name"], "settings": _plain(settings), "complete": False,
                             "cells": store.cells(), "skipped": [], "effective_settings": []}
  results["aggregate"] = tables.aggregate(results["cells"])
  _write_tables(results, out)
  return results


def _usable(entry, n_edits, records) -> list[int]:
  """The entry's numbers of edits that the data holds."""
  return [n for n in _counts(entry.get("n_edits", n_edits), f"methods.{entry['label']}.n_edits")
          if n <= len(records)]


def _skipped(entries, n_edits, records, data_path) -> list[str]:
  return [f"{e['label']}: n_edits={n} > {len(records)} records in {data_path}" for e in entries
          for n in _counts(e.get("n_edits", n_edits), f"methods.{e['label']}.n_edits") if n > len(records)]


def scored_indices(n: int, score_sample: int | None, seed: int) -> np.ndarray:
  """Which of a cell's n edits are scored: all of them, or (n > score_sample) a sorted random sample
  of `score_sample` of them drawn from (seed, n), the same in every run of the sweep.

  Args:
    n: the cell's number of edits (positions in the seed's record order).
    score_sample: the sweep's `eval.score_sample` (None: all).
    seed: the cell's seed.
  """
  if score_sample is None or n <= int(score_sample):
    return np.arange(n)
  return np.sort(np.random.default_rng([int(seed), int(n)]).choice(n, int(score_sample), replace=False))


def _cell(entry, n, seed, timing, scores, seconds, scored=None) -> dict[str, Any]:
  cell = {"method": entry["label"], "editor": entry["name"], "n_edits": int(n), "seed": int(seed),
          "timing": timing, "seconds": round(float(seconds), 3), "summary": scores["summary"],
          "scores": scores}
  if scored is not None and len(scored) < n:  # a sample: say which edits (positions in the order)
    cell["scored"] = [int(i) for i in scored]
  return cell


def _run_batch(ctx, entry, records, order, counts, seed, ev, progress, finished, emit) -> None:
  run = methods_lib.BATCH[entry["name"]]
  for n in tqdm([n for n in counts if n not in finished], desc=f"{entry['label']} (seed {seed})",
                disable=not progress, leave=False):
    chosen = [records[i] for i in order[:n]]
    idx = scored_indices(n, ev["score_sample"], seed)
    start = time.perf_counter()
    # A batch method edits all n; with a score sample only the sampled ones are scored.
    scores = run(ctx, chosen, entry, seed) if len(idx) == n else _run_sampled(run, ctx, chosen, idx, entry, seed)
    emit([_cell(entry, n, seed, "at_once", scores, time.perf_counter() - start, idx)])


def _run_sampled(run, ctx, chosen, idx, entry, seed) -> dict:
  """A batch method's scores of the sampled records only: it edits all of `chosen`, and the score
  closure it calls is narrowed to the sample."""
  sample = dataclasses.replace(
      ctx, score=lambda records, *a, **k: ctx.score([records[i] for i in idx], *a, **k))
  return run(sample, chosen, entry, seed)


def _run_sequential(ctx, entry, records, order, counts, seed, ev, progress, stream, emit) -> None:
  """One stream of edits per seed, scored at each number of edits in `counts` (its checkpoints).

  Resumes from the stream's saved state (`Stream.restore`): checkpoints already in curve.jsonl are
  neither redone nor scored again; a method without `save` / `load` edits again from the start.
  """
  method = methods_lib.SEQUENTIAL[entry["name"]]
  immediate = bool(ev["immediate"])
  chosen = [records[i] for i in order[:max(counts)]]
  state, i, immediate_rows, elapsed0 = stream.restore(ctx, method, entry, seed)
  start = time.perf_counter() - elapsed0

  def checkpoint(n, state):
    elapsed = time.perf_counter() - start
    idx = scored_indices(n, ev["score_sample"], seed)
    logits_fn, gen_fn = method.fns(ctx, state)
    final = ctx.score([chosen[j] for j in idx], logits_fn, gen_fn)
    cells = [_cell(entry, n, seed, "final", final, elapsed, idx)]
    if immediate:
      rows = immediate_rows[:n]
      summary = (unke_eval.summarize if unke.is_unke(chosen[0]) else summarize)(rows)
      cells.append(_cell(entry, n, seed, "immediate", {"summary": summary, "records": rows}, elapsed))
    if n < max(counts):  # the state first: a kill before the line below redoes no edit
      stream.save(ctx, method, state, n, immediate_rows, elapsed)
    emit(cells)

  if i in counts and i not in stream.finished:  # saved, then killed before its line was written
    checkpoint(i, state)
  bar = tqdm(total=len(chosen), initial=i, desc=f"{entry['label']} edits (seed {seed})",
             disable=not progress, leave=False)
  while i < len(chosen):
    # Without immediate scoring, every edit up to the next scored count goes to the editor at once.
    stop = i + 1 if immediate else min(c for c in counts if c > i)
    state = method.edit(ctx, state, chosen[i:stop])
    bar.update(stop - i)
    i = stop
    if immediate:
      logits_fn, gen_fn = method.fns(ctx, state)
      row = ctx.score([chosen[i - 1]], logits_fn, gen_fn, batch_size=ev["immediate_batch_size"])["records"][0]
      immediate_rows.append(json_safe(dict(row, index=i - 1)))
    if i in counts and i not in stream.finished:
      checkpoint(i, state)
  bar.close()


# ---- resume: curve.jsonl (one line per finished cell) and per-stream state ----

SWEEP_FILE = "sweep.json"  # the settings of the sweep a folder holds (a re-run with equal ones resumes)
CURVE = "curve.jsonl"  # one line per finished (model, data, method, seed, n_edits), in run order
STREAMS = "streams"  # per-stream state at its last finished checkpoint (removed when the sweep ends)


def folder_holds(out: str, settings: Mapping[str, Any]) -> bool | None:
  """None: `out` is absent or empty (a new sweep); True: it holds this sweep (`sweep.json` has
  these settings: a re-run resumes it); False: it holds something else."""
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  try:
    with open(os.path.join(out, SWEEP_FILE), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return saved.get("settings") == json.loads(json.dumps(_plain(settings)))


def claim(out: str, settings: Mapping[str, Any]) -> None:
  """Writes `sweep.json` into a new sweep folder; refuses a folder holding another sweep."""
  held = folder_holds(out, settings)
  if held is False and os.path.exists(os.path.join(out, SWEEP_FILE)):
    raise UserError(f"{out}: holds a sweep with other settings (add --overwrite to replace it, or "
                    "choose another folder)")
  if held is not True:
    atomic_write_json(os.path.join(out, SWEEP_FILE), {"settings": json_safe(_plain(settings))})


class Store:
  """The finished cells of a sweep folder (curve.jsonl) and its streams' saved state.

  Args:
    out: the sweep folder.
    write: False on processes that write nothing (multi-host workers read what process 0 wrote).
    read: read the finished cells already in `out` (False: start empty).
  """

  def __init__(self, out: str, write: bool = True, read: bool = True):
    self.out, self.write = out, write
    self.lines: list[dict[str, Any]] = []
    path = os.path.join(out, CURVE)
    if read and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for text in f:
          try:
            self.lines.append(json.loads(text))
          except ValueError:
            break  # a half-written last line of a killed run: that cell is redone
      if write:  # drop the half-written tail, so new lines follow whole ones
        atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in self.lines))

  @staticmethod
  def _key(line) -> tuple:
    return (line["model"], line["data"], line["method"], line["seed"])

  def finished(self, key: tuple) -> set[int]:
    """Numbers of edits of (model, data, method label, seed) with a line."""
    return {line["n_edits"] for line in self.lines if self._key(line) == key}

  def append(self, cells: Sequence[Mapping[str, Any]]) -> None:
    """One line for the cells of one (model, data, method, seed, n_edits): their summaries by timing."""
    first = cells[0]
    line = {k: first[k] for k in ("model", "data", "method", "editor", "seed", "n_edits", "seconds")}
    line["scored"] = len(first["scored"]) if "scored" in first else first["n_edits"]
    if "scored" in first:
      line["scored_indices"] = first["scored"]
    line["summary"] = {c["timing"]: c["summary"] for c in cells}
    line = json_safe(line)
    self.lines.append(line)
    if self.write:
      with open(os.path.join(self.out, CURVE), "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())

  def cells(self) -> list[dict[str, Any]]:
    """results.json's cells (one per timing of each line), in run order."""
    out = []
    for line in self.lines:
      for timing, summary in line["summary"].items():
        cell = {"method": line["method"], "editor": line["editor"], "n_edits": line["n_edits"],
                "seed": line["seed"], "timing": timing, "seconds": line["seconds"], "summary": summary,
                "model": line["model"], "data": line["data"]}
        if line["scored"] < line["n_edits"] and timing != "immediate":
          cell["scored"] = line["scored"]
        out.append(cell)
    return out

  def stream(self, key: tuple) -> "Stream":
    model, data, label, seed = key
    folder = os.path.join(self.out, STREAMS, slug(model), slug(data), slug(label), f"seed{seed}")
    return Stream(folder, self.finished(key), self.write)


@dataclasses.dataclass
class Stream:
  """One sequential stream's resume state: `folder` holds stream.json (edits so far, their
  immediate scores, seconds) and state/ (the method's own `save`), replaced whole at each checkpoint.

  Attributes:
    folder: where the state lives.
    finished: the stream's checkpoints already in curve.jsonl.
    write: whether this process writes (multi-host: process 0).
  """

  folder: str
  finished: set[int]
  write: bool = True

  def save(self, ctx, method, state, n: int, immediate_rows, seconds: float) -> None:
    if not self.write or method.save is None:
      return
    from horse_jax.io import atomic_directory  # noqa: PLC0415
    with atomic_directory(self.folder) as tmp:
      method.save(ctx, state, os.path.join(tmp, "state"))
      atomic_write_json(os.path.join(tmp, "stream.json"),
                        {"n_edits": int(n), "seconds": float(seconds), "immediate": immediate_rows},
                        indent=None)

  def restore(self, ctx, method, entry, seed) -> tuple[Any, int, list, float]:
    """(state, edits applied, immediate rows, seconds so far): the saved stream when there is one
    and the method can `load`, else a fresh start."""
    info = os.path.join(self.folder, "stream.json")
    if self.finished and method.load is not None and os.path.exists(info):
      with open(info, encoding="utf-8") as f:
        saved = json.load(f)
      state = method.load(ctx, entry, seed, os.path.join(self.folder, "state"))
      return state, int(saved["n_edits"]), list(saved["immediate"]), float(saved["seconds"])
    return method.start(ctx, entry, seed), 0, [], 0.0


def _save_cell(out: str, cell: Mapping[str, Any]) -> None:
  folder = os.path.join(out, "cells", slug(cell["model"]), slug(cell["data"]), slug(cell["method"]))
  name = f"n{cell['n_edits']}_seed{cell['seed']}_{cell['timing']}.json"
  write_metrics(os.path.join(folder, name), cell["method"], cell["n_edits"], cell["scores"],
                extra={"editor": cell["editor"], "seed": cell["seed"], "timing": cell["timing"],
                       "seconds": cell["seconds"], "model": cell["model"], "data": cell["data"],
                       # a score sample: the positions (in the seed's record order) of the scored edits
                       **({"scored": cell["scored"]} if "scored" in cell else {})})


def _plain(obj):
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  return obj


def resolve_settings(config_file: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """SweepSettings <- sweep YAML <- --set overrides, as a plain tree (unknown keys are an error
  naming the closest one)."""
  return _plain(dataclasses.asdict(settings_lib.resolve_class(SweepSettings, config_file, overrides)))
