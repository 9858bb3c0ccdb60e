"""Evaluation sweeps: models x datasets x methods x numbers of edits x seeds -> tables and plots.

A sweep YAML (see `eval/*.yaml` and DEFAULTS) names the models and datasets, the methods (entries of
`horse_jax.eval.methods`), the numbers of edits and the seeds. For each seed the records are shuffled
(`sample: random`, or kept in file order with `sample: first`) and the first n are edited:
  batch methods (horse, malmen, mend, unedited): one cell per n, all n edits at once, timing "at_once";
  sequential methods (horen, grace): one run over max(n) edits per seed; at each checkpoint n every
    edit so far is scored on the current model (timing "final"), and each edit is scored right after
    it is made (timing "immediate", summarized over the first n edits).
Outputs in the output folder: results.json (every cell, then mean/std over seeds), results.md (one
markdown table per model/dataset), plots/*.png (metric vs number of edits), and per-cell metrics
files under cells/ (written with `write_metrics`). Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import re
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
      ("unedited",), "method names, or mappings {name, label, hypernet, stats_corpus, settings: {model, "
      "data, editor, eval}} (settings as in `horse-jax settings --method NAME`; stats_corpus: "
      "ROME/MEMIT/AlphaEdit's statistics corpus)")
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
    methods_lib.kind_of(entry["name"])  # unknown names fail before any work
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
              fsdp: bool = False) -> dict[str, Any]:
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
                if methods_lib.kind_of(e["name"]) == "batch" and e["name"] != "unedited"]
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
  results: dict[str, Any] = {"name": settings["name"], "settings": _plain(settings), "complete": False,
                             "cells": [], "skipped": [], "aggregate": [],
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
      for entry in entries:
        counts = _counts(entry.get("n_edits", n_edits), f"methods.{entry['label']}.n_edits")
        usable = [n for n in counts if n <= len(records)]
        for n in counts:
          if n > len(records):
            note = f"{entry['label']}: n_edits={n} > {len(records)} records in {data_path}"
            if write:
              print(f"sweep: skipped {note}", file=sys.stderr)
            results["skipped"].append(note)
        if not usable:
          continue
        for seed in tqdm(seeds, desc=f"{entry['label']} seeds", disable=not progress or len(seeds) < 2):
          order = order_for(len(records), seed, settings["sample"])
          if methods_lib.kind_of(entry["name"]) == "batch":
            cells = _run_batch(ctx, entry, records, order, usable, seed, progress)
          else:
            cells = _run_sequential(ctx, entry, records, order, usable, seed, ev, progress)
          for cell in cells:
            cell.update(group)
            if ev["save_cells"] and write:
              _save_cell(out, cell)
            cell.pop("scores", None)
            results["cells"].append(cell)
            if write and not progress:  # no bars (not a terminal, or --quiet): one line per cell
              progress_lib.log(f"sweep cell {entry['label']} n={cell.get('n_edits')} seed={seed} "
                               f"{cell.get('timing', '')}: {cell.get('seconds', 0.0):.1f} s")
          if write:
            atomic_write_json(os.path.join(out, "results.json"), json_safe(results))  # partial progress
  results["aggregate"] = tables.aggregate(results["cells"])
  results["complete"] = True
  if not write:
    results["plots"] = []
    return results
  results["plots"] = [os.path.relpath(p, out) for p in plots.plot_sweep(results["aggregate"], os.path.join(out, "plots"))]
  atomic_write_text(os.path.join(out, "results.md"), tables.markdown(results))
  atomic_write_json(os.path.join(out, "results.json"), json_safe(results))
  return results


def _cell(entry, n, seed, timing, scores, seconds) -> dict[str, Any]:
  return {"method": entry["label"], "editor": entry["name"], "n_edits": int(n), "seed": int(seed),
          "timing": timing, "seconds": round(float(seconds), 3), "summary": scores["summary"],
          "scores": scores}


def _run_batch(ctx, entry, records, order, counts, seed, progress) -> list[dict[str, Any]]:
  run = methods_lib.BATCH[entry["name"]]
  cells = []
  for n in tqdm(counts, desc=f"{entry['label']} (seed {seed})", disable=not progress, leave=False):
    chosen = [records[i] for i in order[:n]]
    start = time.perf_counter()
    scores = run(ctx, chosen, entry, seed)
    cells.append(_cell(entry, n, seed, "at_once", scores, time.perf_counter() - start))
  return cells


def _run_sequential(ctx, entry, records, order, counts, seed, ev, progress) -> list[dict[str, Any]]:
  method = methods_lib.SEQUENTIAL[entry["name"]]
  immediate = bool(ev["immediate"])
  chosen = [records[i] for i in order[:max(counts)]]
  state = method.start(ctx, entry, seed)
  immediate_rows: list[dict[str, Any]] = []
  cells = []
  start = time.perf_counter()
  bar = tqdm(total=len(chosen), desc=f"{entry['label']} edits (seed {seed})", disable=not progress,
             leave=False)
  i = 0
  while i < len(chosen):
    # Without immediate scoring, every edit up to the next scored count goes to the editor at once.
    stop = i + 1 if immediate else min(c for c in counts if c > i)
    state = method.edit(ctx, state, chosen[i:stop])
    bar.update(stop - i)
    i = stop - 1
    if immediate:
      logits_fn, gen_fn = method.fns(ctx, state)
      row = ctx.score([chosen[i]], logits_fn, gen_fn, batch_size=ev["immediate_batch_size"])["records"][0]
      immediate_rows.append(dict(row, index=i))
    if i + 1 in counts:
      n = i + 1
      elapsed = time.perf_counter() - start
      logits_fn, gen_fn = method.fns(ctx, state)
      final = ctx.score(chosen[:n], logits_fn, gen_fn)
      cells.append(_cell(entry, n, seed, "final", final, elapsed))
      if immediate:
        rows = immediate_rows[:n]
        summary = (unke_eval.summarize if unke.is_unke(chosen[0]) else summarize)(rows)
        cells.append(_cell(entry, n, seed, "immediate", {"summary": summary, "records": rows}, elapsed))
    i += 1
  bar.close()
  return cells


def _save_cell(out: str, cell: Mapping[str, Any]) -> None:
  folder = os.path.join(out, "cells", slug(cell["model"]), slug(cell["data"]), slug(cell["method"]))
  name = f"n{cell['n_edits']}_seed{cell['seed']}_{cell['timing']}.json"
  write_metrics(os.path.join(folder, name), cell["method"], cell["n_edits"], cell["scores"],
                extra={"editor": cell["editor"], "seed": cell["seed"], "timing": cell["timing"],
                       "seconds": cell["seconds"], "model": cell["model"], "data": cell["data"]})


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
