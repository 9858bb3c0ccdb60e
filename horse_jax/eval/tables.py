"""Sweep tables: mean and std over seeds per (model, data, method, timing, n_edits), as markdown."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

# (summary key, column title); teacher-forced first, generation-based when present.
COLUMNS = (("edit_acc", "ES"), ("rephrase_acc", "GS"), ("loc_acc", "loc_acc"), ("loc_agree", "loc_agree"),
           ("port_acc", "portability"), ("overall", "overall"))
GEN_COLUMNS = (("gen_edit_acc", "gen ES"), ("gen_rephrase_acc", "gen GS"), ("gen_loc_acc", "gen loc_acc"),
               ("gen_loc_agree", "gen loc_agree"), ("gen_port_acc", "gen portability"),
               ("gen_overall", "gen overall"))
# UnKE (unstructured) data: teacher-forced token accuracy of the long answer, and generation scores
# (ROUGE recall and BLEU-1 against the answers; `horse_jax.eval.unke`).
UNKE_COLUMNS = (("question_token_acc", "answer token acc"), ("question_rougeL_recall", "question ROUGE-L R"),
                ("question_bleu1", "question BLEU-1"), ("para_question_rougeL_recall", "paraphrase ROUGE-L R"),
                ("sub_question_rougeL_recall", "sub-question ROUGE-L R"))
METRICS = tuple(k for k, _ in COLUMNS + GEN_COLUMNS + UNKE_COLUMNS) + (
    "pre_edit_acc", "pre_rephrase_acc", "pre_loc_acc")
TIMING_ORDER = {"at_once": 0, "final": 1, "immediate": 2}


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  """Mean and std over seeds (sample std, ddof=1; 0 for a single seed); None when no value."""
  vs = np.array([v for v in values if v is not None], np.float64)
  if vs.size == 0:
    return {"mean": None, "std": None, "n": 0}
  std = float(np.std(vs, ddof=1)) if vs.size > 1 else 0.0
  return {"mean": float(np.mean(vs)), "std": std, "n": int(vs.size)}


def aggregate(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups cells over seeds.

  Args:
    cells: sweep cells with model, data, method, timing, n_edits, seed, seconds, summary.

  Returns:
    One row per group, sorted by model, data, method order of appearance, timing, n_edits, with
    {metric: {"mean", "std", "n"}} for each metric and the overall locality used.
  """
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  method_order: dict[str, int] = {}
  for c in cells:
    method_order.setdefault(c["method"], len(method_order))
    groups.setdefault((c["model"], c["data"], c["method"], c["timing"], c["n_edits"]), []).append(c)
  rows = []
  for (model, data, method, timing, n), group in groups.items():
    row: dict[str, Any] = {"model": model, "data": data, "method": method, "timing": timing, "n_edits": n,
                           "seeds": sorted(c["seed"] for c in group),
                           "seconds": mean_std([c.get("seconds") for c in group])}
    for key in METRICS:
      row[key] = mean_std([c["summary"].get(key) for c in group])
    localities = {c["summary"].get("overall_locality") for c in group} - {None}
    row["overall_locality"] = "/".join(sorted(localities)) or None
    rows.append(row)
  rows.sort(key=lambda r: (r["model"], r["data"], method_order[r["method"]], TIMING_ORDER.get(r["timing"], 9),
                           r["n_edits"]))
  return rows


def _fmt(stat: Mapping[str, Any], seeds: int) -> str:
  if stat["mean"] is None:
    return "–"
  if seeds > 1:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"
  return f"{stat['mean']:.3f}"


def markdown(results: Mapping[str, Any]) -> str:
  """results.md: one table per (model, data); mean ± std over seeds for each metric."""
  rows = results["aggregate"]
  lines = [f"# Sweep `{results['name']}`", "",
           "Teacher-forced token accuracy: ES = edit prompts, GS = rephrases, loc_acc = unrelated prompts "
           "vs their gold answers, loc_agree = post- vs pre-edit argmax on the unrelated answers. "
           "overall = mean(ES, GS, locality) with the locality named in its column. "
           "Cells show mean ± sample std over seeds. Timing: `at_once` = all edits applied together; "
           "`final` = every edit scored on the model after the last one; `immediate` = each edit scored "
           "right after it was made. Seconds = wall time of the cell including scoring.", ""]
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["data"]), []).append(r)
  for (model, data), group in groups.items():
    columns = [(k, t) for k, t in COLUMNS if any(r[k]["mean"] is not None for r in group)]
    gen = [(k, t) for k, t in GEN_COLUMNS if any(r[k]["mean"] is not None for r in group)]
    columns += gen
    columns += [(k, t) for k, t in UNKE_COLUMNS if any(r[k]["mean"] is not None for r in group)]
    lines += [f"## model `{model}` · data `{data}`", ""]
    header = ["method", "timing", "n_edits", "seeds"] + [t for _, t in columns] + ["overall locality", "seconds"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 4) + ["---", "---:"]) + "|")
    for r in group:
      k = len(r["seeds"])
      cells = [r["method"], r["timing"], str(r["n_edits"]), str(k)] + [_fmt(r[key], k) for key, _ in columns]
      cells += [r["overall_locality"] or "–", _fmt(r["seconds"], k)]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  sample = (results.get("settings") or {}).get("eval", {}).get("score_sample")
  if sample:
    lines += [f"Scored: cells of more than {sample} edits score a seeded random sample of {sample} of "
              "them (`eval.score_sample`; `scored` in results.json and curve.jsonl, the sampled "
              "positions in cells/); `immediate` cells score every edit once, right after it.", ""]
  if results.get("skipped"):
    lines += ["Skipped cells:", ""] + [f"- {s}" for s in results["skipped"]] + [""]
  if results.get("plots"):
    lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in results["plots"]), ""]
  if results.get("curves"):
    lines += ["Curves (seeds as bands): " + ", ".join(f"[{p}]({p})" for p in results["curves"]), ""]
  return "\n".join(lines)


# The paper's comparison layout: per number of edits, these columns (overall's locality is the one
# named in results.md's `overall locality` column).
PAPER_COLUMNS = (("edit_acc", "ES"), ("rephrase_acc", "GS"), ("loc_agree", "loc"), ("overall", "overall"))


def paper_table(results: Mapping[str, Any]) -> str:
  """table.md: the HoReN paper's table layout, one row per method and one group of columns (ES,
  GS, locality, overall) per number of edits; a sequential method's row is its `final` timing
  (every edit so far scored after the last one), a batch method's `at_once`. Mean over seeds
  (± sample std with several); "–" where a cell was not run.

  Args:
    results: a sweep's results (its `aggregate` rows).

  Returns:
    The markdown text.
  """
  lines = [f"# Sweep `{results['name']}`: the comparison table", "",
           "Rows: methods; per number of edits N: ES (edit prompts), GS (rephrases), loc "
           "(loc_agree: post- vs pre-edit argmax on unrelated prompts) and overall = mean(ES, GS, loc), "
           "teacher-forced token accuracy, every edit so far scored after the N-th edit (sequential "
           "methods) or after all N at once (batch methods: `timing` at_once).", ""]
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in results["aggregate"]:
    if r["timing"] in ("final", "at_once"):
      groups.setdefault((r["model"], r["data"]), []).append(r)
  for (model, data), group in groups.items():
    counts = sorted({r["n_edits"] for r in group})
    methods = list(dict.fromkeys(r["method"] for r in group))
    by = {(r["method"], r["n_edits"]): r for r in group}
    lines += [f"## model `{model}` · data `{data}`", ""]
    header = ["method", "timing"] + [f"{t} @{n}" for n in counts for _, t in PAPER_COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    for method in methods:
      timing = next(r["timing"] for r in group if r["method"] == method)
      cells = [method, timing]
      for n in counts:
        row = by.get((method, n))
        cells += [_fmt(row[key], len(row["seeds"])) if row else "–" for key, _ in PAPER_COLUMNS]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if not results.get("complete", True):
    lines += ["Unfinished sweep: cells marked – were not run yet (`horse-jax eval` with the same "
              "settings resumes it).", ""]
  return "\n".join(lines)
