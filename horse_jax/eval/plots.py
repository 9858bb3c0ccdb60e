"""Sweep plots: each metric against the number of edits (log x-axis), one line per method and timing:
error bars of the seeds' std (`plot_sweep`, plots/), or bands from the lowest to the highest seed
(`plot_curves`, curves/)."""

from __future__ import annotations

import io
import math
import os
import re
from typing import Any, Mapping, Sequence

from horse_jax.io import atomic_write_bytes

# (summary key, panel title) in panel order; panels without data are left out.
PANELS = (("edit_acc", "Edit success (ES)"), ("rephrase_acc", "Generalization (GS)"),
          ("loc_acc", "Locality vs gold (loc_acc)"), ("loc_agree", "Locality vs pre-edit (loc_agree)"),
          ("port_acc", "Portability"), ("overall", "Overall"),
          ("gen_edit_acc", "Generation ES"), ("gen_rephrase_acc", "Generation GS"),
          ("gen_loc_agree", "Generation locality (agreement)"), ("gen_overall", "Generation overall"),
          # UnKE (unstructured) data
          ("question_token_acc", "UnKE answer token accuracy"),
          ("question_rougeL_recall", "UnKE question ROUGE-L recall"),
          ("question_bleu1", "UnKE question BLEU-1"),
          ("para_question_rougeL_recall", "UnKE paraphrase ROUGE-L recall"),
          ("sub_question_rougeL_recall", "UnKE sub-question ROUGE-L recall"))
_STYLE = {"at_once": "-", "final": "-", "immediate": "--"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _slug(text: str) -> str:
  base = os.path.basename(os.path.normpath(str(text))) or str(text)
  return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "x"


def _pyplot():
  """pyplot on the Agg backend (files only: works without a display)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_group(rows: Sequence[Mapping[str, Any]], title: str):
  """A matplotlib figure with one panel per metric for one (model, data) group."""
  plt = _pyplot()

  panels = [(k, t) for k, t in PANELS if any(r[k]["mean"] is not None for r in rows)]
  cols = min(3, len(panels))
  nrows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
  lines: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in rows:
    lines.setdefault((r["method"], r["timing"]), []).append(r)
  colors, markers = {}, {}
  for method, _ in lines:
    colors.setdefault(method, f"C{len(colors) % 10}")
    # Distinct markers (drawn smaller for later methods) keep coinciding lines visible.
    markers.setdefault(method, (_MARKERS[len(markers) % len(_MARKERS)], max(7 - len(markers), 3)))
  all_n = sorted({r["n_edits"] for r in rows})
  for ax, (key, panel_title) in zip(axes.flat, panels):
    for (method, timing), pts in lines.items():
      pts = sorted((p for p in pts if p[key]["mean"] is not None), key=lambda p: p["n_edits"])
      if not pts:
        continue
      label = method if timing == "at_once" else f"{method} ({timing})"
      ax.errorbar([p["n_edits"] for p in pts], [p[key]["mean"] for p in pts],
                  yerr=[p[key]["std"] or 0.0 for p in pts], label=label, color=colors[method],
                  linestyle=_STYLE.get(timing, "-"), marker=markers[method][0],
                  markersize=markers[method][1], capsize=3, alpha=0.9)
    ax.set_xscale("log")
    if all_n:
      ax.set_xlim(all_n[0] / 1.6, all_n[-1] * 1.6)
      ax.set_xticks(all_n)
      ax.set_xticklabels([str(n) for n in all_n])
      ax.minorticks_off()
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("accuracy")
    ax.set_title(panel_title, fontsize=10)
    ax.grid(True, alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  ncol = min(len(labels), 4) or 1
  legend_rows = math.ceil(len(labels) / ncol)
  height = fig.get_size_inches()[1]
  bottom = min((0.3 * legend_rows + 0.25) / height, 0.4)  # room for the legend below the panels
  fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, bottom, 1, 0.95))
  return fig


def plot_sweep(aggregate: Sequence[Mapping[str, Any]], folder: str) -> list[str]:
  """One PNG per (model, data) group of the aggregated sweep rows; returns the paths written."""
  plt = _pyplot()

  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for r in aggregate:
    groups.setdefault((r["model"], r["data"]), []).append(r)
  paths = []
  for (model, data), rows in groups.items():
    fig = plot_group(rows, f"{_slug(model)} · {_slug(data)}: metric vs number of edits (mean ± std over seeds)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = os.path.join(folder, f"{_slug(model)}__{_slug(data)}.png")
    atomic_write_bytes(path, buf.getvalue())
    paths.append(path)
  return paths


def plot_curve_group(cells: Sequence[Mapping[str, Any]], title: str):
  """A figure with one panel per metric for one (model, data) group of per-seed cells: each method
  and timing a line through the mean over seeds, its band spanning the seeds' lowest to highest."""
  import numpy as np  # noqa: PLC0415
  plt = _pyplot()
  panels = [(k, t) for k, t in PANELS if any(c["summary"].get(k) is not None for c in cells)]
  cols = min(3, len(panels))
  nrows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
  lines: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for c in cells:
    lines.setdefault((c["method"], c["timing"]), []).append(c)
  colors: dict[str, str] = {}
  for method, _ in lines:
    colors.setdefault(method, f"C{len(colors) % 10}")
  all_n = sorted({c["n_edits"] for c in cells})
  for ax, (key, panel_title) in zip(axes.flat, panels):
    for (method, timing), pts in lines.items():
      by_n: dict[int, list[float]] = {}
      for c in pts:
        if c["summary"].get(key) is not None:
          by_n.setdefault(c["n_edits"], []).append(float(c["summary"][key]))
      if not by_n:
        continue
      ns = sorted(by_n)
      vals = [np.asarray(by_n[n]) for n in ns]
      label = method if timing == "at_once" else f"{method} ({timing})"
      style = _STYLE.get(timing, "-")
      ax.plot(ns, [v.mean() for v in vals], linestyle=style, marker="o", markersize=3,
              color=colors[method], label=label)
      ax.fill_between(ns, [v.min() for v in vals], [v.max() for v in vals], color=colors[method],
                      alpha=0.12 if timing == "immediate" else 0.25, linewidth=0)
    ax.set_xscale("log")
    if all_n:
      ax.set_xlim(all_n[0] / 1.3, all_n[-1] * 1.3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("accuracy")
    ax.set_title(panel_title, fontsize=10)
    ax.grid(True, alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  ncol = min(len(labels), 4) or 1
  height = fig.get_size_inches()[1]
  bottom = min((0.3 * math.ceil(len(labels) / ncol) + 0.25) / height, 0.4)
  fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, bottom, 1, 0.95))
  return fig


def plot_curves(cells: Sequence[Mapping[str, Any]], folder: str) -> list[str]:
  """One PNG per (model, data) group of a sweep's per-seed cells (`plot_curve_group`): the curve
  of every metric over the numbers of edits, seeds as bands; returns the paths written."""
  plt = _pyplot()
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for c in cells:
    groups.setdefault((c["model"], c["data"]), []).append(c)
  paths = []
  for (model, data), group in groups.items():
    seeds = len({c["seed"] for c in group})
    fig = plot_curve_group(group, f"{_slug(model)} · {_slug(data)}: metric vs number of edits "
                                  f"(mean over {seeds} seed(s); band: lowest to highest seed)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = os.path.join(folder, f"{_slug(model)}__{_slug(data)}.png")
    atomic_write_bytes(path, buf.getvalue())
    paths.append(path)
  return paths
