"""`horse-jax edit --method defer|wise`: sequential edits by an editor that wraps one module.

Writes to --out (built beside it and swapped in whole at the end; horse-jax.json, written last,
marks it finished):
  metrics.json     every edit scored on the final model (pre-edit model as reference), plus
                   extra["immediate"]: each edit's own ES right after it was made, and
                   extra["effective_settings"]: every setting's value and source
  state.npz        the editor's arrays (DEFER: gate and adapter; WISE: side memories), by name
  progress.jsonl   with --eval-every K: all edits so far re-scored every K edits (one line each)
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from horse_jax import outputs
from horse_jax.editors import protocol
from horse_jax.io import atomic_write_text


def _flat_arrays(tree, prefix="") -> dict[str, np.ndarray]:
  """{dotted name: array} of a NamedTuple / dict tree of arrays (for state.npz)."""
  if hasattr(tree, "_asdict"):
    tree = tree._asdict()
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      if k != "rng":  # WISE's numpy RandomState state: host bookkeeping, not an array
        out.update(_flat_arrays(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: np.asarray(jax.device_get(tree))}


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits in sequence, scores and writes; `mesh`/`fsdp` come from `common.setup_devices`."""
  from horse_jax import distributed
  from horse_jax.cli import edit_common
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  main = distributed.is_main()
  edit_common.require_model(args.model)
  resolved = edit_common.resolve(args, read_config(args.model))
  model, tokenizer, records = edit_common.load(args, resolved, mesh, fsdp)
  editor = protocol.make_editor(args.method, model, tokenizer, resolved, mesh=mesh)
  state = editor.init(jax.random.PRNGKey(args.seed))
  batch_size = int(resolved["eval.batch_size"])
  generate = args.eval_mode == "generate"

  def score(records, edited):
    return edit_common.score(records, tokenizer, model, edited.logits,
                             edited.generate if generate else None, batch_size, main)

  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    lines: list[str] = []

    def rescore(state, done):
      scores = score(records[:done], editor.apply(state))
      lines.append(json.dumps({"n_edits": done, "summary": scores["summary"]}))
      if main:
        atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(lines) + "\n")

    state, immediate, edit_s = edit_common.edit_in_chunks(
        editor, state, records, args, main, between=rescore if args.eval_every else None)
    edited = editor.apply(state)
    arrays = _flat_arrays(state)
    scores = score(records, edited)
    if not main:
      return 0
    np.savez(os.path.join(out, "state.npz"), **arrays)
    if args.eval_every:
      lines.append(json.dumps({"n_edits": len(records), "summary": scores["summary"]}))
      atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(lines) + "\n")
    imm = {"edit_acc": float(np.mean([x["edit_acc"] for x in immediate])), "records": immediate}
    extra = {
        "scoring": {"summary": "all edits scored on the final model, the decision taken on the "
                               "whole prompt + target (last target token included)",
                    "immediate": "each edit's own ES, teacher-forced, right after that edit"},
        "immediate": imm,
        **edit_common.settings_extra(resolved, editor.config),
        "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
        "editor": edited.metrics,
    }
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores, extra)
  print(edit_common.summary_line(args.method, len(records), scores,
                                 f"{edit_s:.1f} s, ES right after each edit {imm['edit_acc']:.3f}",
                                 args.out))
  return 0
