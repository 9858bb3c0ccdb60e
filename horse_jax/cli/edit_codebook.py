"""`horse-jax edit --method horen|grace`: sequential edits into a codebook around one layer.

Writes to --out (built beside it and swapped in whole at the end; horse-jax.json, written last,
marks it finished):
  codebook/        orbax state + codebook.safetensors + settings.json (the base model is untouched;
                   edited model = --model + this folder, see `codebook.load_edited_model`)
  metrics.json     every edit scored on the final model (pre-edit model as reference), plus
                   extra["immediate"]: each edit's own ES scored right after it was made, and
                   extra["effective_settings"]: every setting's value and source (default, card,
                   codebook, config, set, run)
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
from horse_jax.editors import protocol
from horse_jax.editors.codebook import edit as edit_lib
from horse_jax.editors.codebook import infer, persist
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_text


def resolve(args, model, saved: dict[str, Any] | None = None):
  """The run's `horse_jax.settings.Resolved`: defaults <- model card <- the continued codebook's own
  <- --config <- --set; --seed fills editor.seed and --dtype model.dtype when given."""
  resolved = protocol.resolve_settings(args.method, args.model, model, codebook=saved,
                                       configs=_configs(args), overrides=args.overrides)
  protocol.with_seed(resolved, args.seed)
  if getattr(args, "dtype", None):
    resolved.values["model.dtype"], resolved.sources["model.dtype"] = args.dtype, "set"
  return resolved


def _configs(args) -> list[str]:
  config = getattr(args, "config", None)
  return [] if not config else [config] if isinstance(config, str) else list(config)


def _score(records, tokenizer, model, book, settings, pre_fn, generate: bool, batch_size: int):
  from horse_jax import runtime
  from horse_jax.eval.scoring import score_records
  gen = pre_gen = None
  if generate:
    gen, pre_gen = infer.generate_fn(model, book, settings), runtime.generate_fn(model)
  return score_records(records, tokenizer, infer.logits_fn(model, book, settings), pre_fn,
                       batch_size=batch_size, generate_fn=gen, pre_generate_fn=pre_gen,
                       max_length=model.config.max_position_embeddings,
                       progress=progress.bars_enabled())


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits in sequence, writes and scores; `mesh`/`fsdp` come from `common.setup_devices`."""
  from horse_jax import distributed, export, runtime
  from horse_jax.data.loaders import load_records
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  main = distributed.is_main()  # multi-host: every process edits, process 0 writes and prints
  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  book, saved = None, None
  if args.codebook:
    book, old = persist.load(args.codebook)
    if old.method != args.method:
      raise UserError(f"--codebook {args.codebook}: a {old.method} codebook, not {args.method}")
    saved = old.to_editor_dict()
  resolved = resolve(args, read_config(args.model), saved)
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  where = f"--codebook {args.codebook}" if args.codebook else None
  try:
    editor = protocol.make_editor(args.method, model, tokenizer, resolved, codebook=book,
                                  mesh=mesh)
  except UserError as err:
    raise UserError(f"{where}: {err}" if where else str(err)) from None
  settings = editor.config
  book = editor.init(jax.random.PRNGKey(args.seed))

  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  batch_size = int(resolved["eval.batch_size"])
  pre_fn = runtime.logits_fn(model)
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    progress_lines: list[str] = []
    immediate: list[dict[str, Any]] = []
    compiles0 = edit_lib.compile_count()
    edit_s = 0.0
    # Edits go to the editor in chunks (up to the next --eval-every point): blocks of edits with no
    # host sync per edit; the losses are checked when a chunk's info arrives.
    bar = progress.bar(total=len(records), desc=f"{args.method} edits", unit="edit", disable=not main)
    step = args.eval_every or len(records)
    for start in range(0, len(records), step):
      t0 = time.time()
      book, infos = editor.edit(book, records[start:start + step])
      edit_s += time.time() - t0
      bar.update(len(infos))
      for i, info in enumerate(infos, start):
        if not np.isfinite(info["loss_last"]):
          raise UserError(f"{args.data}: record {i}: the edit loss became {info['loss_last']} "
                          "(lower editor.edit_lr)")
        immediate.append({"index": i, **info})
      i = start + len(infos) - 1
      if args.eval_every and (i + 1) % args.eval_every == 0 and i + 1 < len(records):
        scores = _score(records[:i + 1], tokenizer, model, book, settings, pre_fn,
                        args.eval_mode == "generate", batch_size)
        progress_lines.append(json.dumps({"n_edits": i + 1, "summary": scores["summary"]}))
        if main:
          atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(progress_lines) + "\n")
    bar.close()
    if not progress.bars_enabled():
      progress.log(f"{args.method}: {len(records)} sequential edits: {edit_s:.1f} s")

    # Every process: the gather is collective; process 0 writes.
    export.save_codebook(os.path.join(out or args.out, "codebook"), book, settings,
                         extra={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data)})
    with progress.stage(f"scoring {len(records)} edits"):
      scores = _score(records, tokenizer, model, book, settings, pre_fn, args.eval_mode == "generate",
                      batch_size)
    if not main:
      return 0
    if args.eval_every:
      progress_lines.append(json.dumps({"n_edits": len(records), "summary": scores["summary"]}))
      atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(progress_lines) + "\n")
    imm = {"edit_acc": float(np.mean([x["edit_acc"] for x in immediate])),
           "added": int(sum(x["added"] for x in immediate)), "records": immediate}
    extra = {
        "scoring": {"summary": "all edits scored on the final model (p = last prompt token)",
                    "immediate": "each edit's own ES, teacher-forced, right after that edit"},
        "immediate": imm,
        "settings": {"editor": settings.to_editor_dict(), "data": resolved.tree()["data"],
                     "eval": resolved.tree()["eval"], "model": resolved.tree()["model"]},
        "effective_settings": resolved.effective(),
        "ignored_settings": resolved.ignored,
        "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
        "compile_count": edit_lib.compile_count() - compiles0,
        "codebook": {"rows": int(book.count), "capacity": book.capacity, "bytes": book.nbytes()},
        "continued_from": args.codebook,
    }
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores, extra)
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits ({imm['added']} new keys, {edit_s:.1f} s)  "
        f"ES right after each edit {imm['edit_acc']:.3f}  final: ES {s.get('edit_acc')}  "
        f"GS {s.get('rephrase_acc')}  loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}"
        f"  -> {args.out}")
  return 0
