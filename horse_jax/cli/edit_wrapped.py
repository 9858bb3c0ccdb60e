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
import time
from typing import Any

import jax
import numpy as np

from horse_jax import outputs, progress
from horse_jax.cli.edit_codebook import resolve
from horse_jax.editors import protocol
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_text


def _score(records, tokenizer, model, edited, generate: bool, batch_size: int):
  from horse_jax import runtime
  from horse_jax.eval.scoring import score_records
  gen = pre_gen = None
  if generate:
    gen, pre_gen = edited.generate, runtime.generate_fn(model)
  return score_records(records, tokenizer, edited.logits, runtime.logits_fn(model),
                       batch_size=batch_size, generate_fn=gen, pre_generate_fn=pre_gen,
                       max_length=model.config.max_position_embeddings,
                       progress=progress.bars_enabled())


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
  from horse_jax import distributed, runtime
  from horse_jax.data.loaders import load_records
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  main = distributed.is_main()
  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  resolved = resolve(args, read_config(args.model))
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  editor = protocol.make_editor(args.method, model, tokenizer, resolved, mesh=mesh)
  state = editor.init(jax.random.PRNGKey(args.seed))
  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  batch_size = int(resolved["eval.batch_size"])
  generate = args.eval_mode == "generate"
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    lines: list[str] = []
    immediate: list[dict[str, Any]] = []
    edit_s = 0.0
    bar = progress.bar(total=len(records), desc=f"{args.method} edits", unit="edit", disable=not main)
    step = args.eval_every or len(records)
    for start in range(0, len(records), step):
      t0 = time.time()
      state, infos = editor.edit(state, records[start:start + step])
      edit_s += time.time() - t0
      bar.update(len(infos))
      for i, info in enumerate(infos, start):
        if not np.isfinite(info["loss_last"]):
          raise UserError(f"{args.data}: record {i}: the edit loss became {info['loss_last']} "
                          "(lower editor.edit_lr)")
        immediate.append({"index": i, **info})
      done = start + len(infos)
      if args.eval_every and done % args.eval_every == 0 and done < len(records):
        scores = _score(records[:done], tokenizer, model, editor.apply(state), generate, batch_size)
        lines.append(json.dumps({"n_edits": done, "summary": scores["summary"]}))
        if main:
          atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(lines) + "\n")
    bar.close()
    if not progress.bars_enabled():
      progress.log(f"{args.method}: {len(records)} sequential edits: {edit_s:.1f} s")
    edited = editor.apply(state)
    arrays = _flat_arrays(state)
    with progress.stage(f"scoring {len(records)} edits"):
      scores = _score(records, tokenizer, model, edited, generate, batch_size)
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
        "settings": {"editor": editor.config.to_editor_dict(), "data": resolved.tree()["data"],
                     "eval": resolved.tree()["eval"], "model": resolved.tree()["model"]},
        "effective_settings": resolved.effective(),
        "ignored_settings": resolved.ignored,
        "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
        "editor": edited.metrics,
    }
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores, extra)
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits ({edit_s:.1f} s)  ES right after each edit "
        f"{imm['edit_acc']:.3f}  final: ES {s.get('edit_acc')}  GS {s.get('rephrase_acc')}  "
        f"loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}  -> {args.out}")
  return 0
