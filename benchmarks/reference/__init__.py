"""Our editors timed against the HoReN reference code (github ha11ucin8/HoReN) on the same CPU.

The reference is not shipped or copied: the user points to a checkout of it
(`horse-jax bench --reference-code DIR`, or `HORSE_JAX_REFERENCE_CODE`), whose editors are imported
at run time and run on the CPU under a shim (`shim`). Both sides edit the same records of the same
model, one request per call, one side after the other (`harness`); the model is a random Llama with
Llama-3-8B's 32 layers at the world model's width, so every reference hparams file is read as
written (`model`).

  per_edit_seconds(method, model_dir, records, *, code_dir, ...)  -> {"reference_s", "ours_s", ...}
  rows(world, methods, code_dir, ...)                               -> `horse-jax bench` rows

Needs torch and transformers (the `[torch]` extra); nothing here runs without a checkout.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from benchmarks.reference.harness import SPECS, STEP_KEYS, per_edit_seconds  # noqa: F401

ENV = "HORSE_JAX_REFERENCE_CODE"
METHODS = tuple(SPECS)


def code_dir(given: str | None) -> str | None:
  """The reference checkout: `given` (--reference-code) or the environment variable, or None."""
  return given or os.environ.get(ENV) or None


def needs(method: str, why: str) -> dict[str, Any]:
  """The row of a reference benchmark that could not run, saying what it needs."""
  return {"benchmark": f"reference_{method}", "method": method, "skipped": why}


def rows(world: dict, methods: Sequence[str], checkout: str | None, *, n_edits: int = 5,
         n_warm: int = 1, steps: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
  """One row per method: ours and the reference's ms per edit on the 32-layer model.

  Args:
    world: `benchmarks.suite.load_world`'s dict (its folder and test records are used).
    methods: keys of `SPECS`.
    checkout: the reference checkout (None: each row says it is needed).
    n_edits: edits timed per side (after `n_warm` untimed ones).
    n_warm: untimed leading edits per side.
    steps: a reduced iteration count for every method (its `STEP_KEYS` name), the same on both
      sides; None: the hparams files' counts.
    progress: print a line per edit to stderr and one per method.
  """
  if not checkout:
    return [needs(m, f"needs --reference-code DIR (a checkout of github ha11ucin8/HoReN; or "
                     f"{ENV})") for m in methods]
  try:
    import torch  # noqa: F401, PLC0415
    import transformers  # noqa: F401, PLC0415
  except ImportError:
    return [needs(m, "needs torch and transformers (pip install -e '.[torch]')") for m in methods]
  from benchmarks.reference import model as model_lib, shim  # noqa: PLC0415
  try:
    shim.check_checkout(checkout)
  except FileNotFoundError as err:
    return [needs(m, str(err)) for m in methods]
  if "reference_work" not in world:
    import tempfile  # noqa: PLC0415
    world["reference_work"] = tempfile.mkdtemp(prefix="horse-jax-refbench-")
  work = world["reference_work"]
  folder = model_lib.build(work, os.path.dirname(world["model_path"]))
  records = world["records"][:n_warm + n_edits]
  out = []
  for method in methods:
    step = {STEP_KEYS[method]: steps} if steps and method in STEP_KEYS else {}
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    try:
      r = per_edit_seconds(method, folder, records, code_dir=checkout, n_warm=n_warm, steps=step,
                           work=os.path.join(work, method), log=log,
                           stats_dir=os.path.join(work, "stats"))
    except Exception as err:  # noqa: BLE001  (either side failing leaves the other rows)
      out.append(needs(method, f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"))
      continue
    shape = f"{model_lib.shape()}, 1 request per call, torch threads {r['torch_threads']}"
    row = {"benchmark": f"reference_{method}", "method": method, "ours_ms": 1e3 * r["ours_s"],
           "reference_ms": 1e3 * r["reference_s"], "ratio": r["ratio"], "shape": shape,
           "edits": r["edits"],
           "steps": ", ".join(f"{k}={v}" for k, v in step.items()) or "as the hparams file",
           "torch_threads": r["torch_threads"], "load_average": r["load_average"],
           "reference_times_s": r["reference_times"],
           "ours_times_s": r["ours_times"]}
    if progress:
      print(f"{method}: ours {row['ours_ms']:.1f} ms/edit, reference {row['reference_ms']:.1f} "
            f"ms/edit ({row['ratio']:.1f}x), load {row['load_average']:.1f}", flush=True)
    out.append(row)
  return out


def markdown(rows_: Sequence[dict[str, Any]]) -> str:
  """The reference rows as a markdown table (skipped ones say what they need)."""
  lines = ["| method | ours ms/edit | reference ms/edit | ratio | shape | edits timed | steps | "
           "load average |", "|---|---:|---:|---:|---|---:|---|---:|"]
  for r in rows_:
    if "skipped" in r:
      lines.append(f"| {r['method']} | - | - | - | {r['skipped']} | 0 | - | - |")
    else:
      lines.append(f"| {r['method']} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} | "
                   f"{r['ratio']:.1f}x | {r['shape']} | {r['edits']} | {r['steps']} | "
                   f"{r['load_average']:.1f} |")
  return "\n".join(lines) + "\n"
