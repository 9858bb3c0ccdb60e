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

import jax
import numpy as np
from horse_jax import outputs
from horse_jax.cli import edit_common
from horse_jax.editors import protocol
from horse_jax.editors.codebook import edit as edit_lib
from horse_jax.editors.codebook import infer, persist
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_text


def _score(records, tokenizer, model, book, settings, generate: bool, batch_size: int, main: bool):
  return edit_common.score(records, tokenizer, model, infer.logits_fn(model, book, settings),
                           infer.generate_fn(model, book, settings) if generate else None,
                           batch_size, main)


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits in sequence, writes and scores; `mesh`/`fsdp` come from `common.setup_devices`."""
  from horse_jax import distributed, export
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  main = distributed.is_main()  # multi-host: every process edits, process 0 writes and prints
  edit_common.require_model(args.model)
  book, saved = None, None
  if args.codebook:
    book, old = persist.load(args.codebook)
    if old.method != args.method:
      raise UserError(f"--codebook {args.codebook}: a {old.method} codebook, not {args.method}")
    saved = old.to_editor_dict()
  resolved = edit_common.resolve(args, read_config(args.model), saved)
  model, tokenizer, records = edit_common.load(args, resolved, mesh, fsdp)
  where = f"--codebook {args.codebook}" if args.codebook else None
  try:
    editor = protocol.make_editor(args.method, model, tokenizer, resolved, codebook=book,
                                  mesh=mesh)
  except UserError as err:
    raise UserError(f"{where}: {err}" if where else str(err)) from None
  settings = editor.config
  book = editor.init(jax.random.PRNGKey(args.seed))
  batch_size = int(resolved["eval.batch_size"])
  generate = args.eval_mode == "generate"
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    progress_lines: list[str] = []

    def rescore(book, done):
      scores = _score(records[:done], tokenizer, model, book, settings, generate, batch_size, main)
      progress_lines.append(json.dumps({"n_edits": done, "summary": scores["summary"]}))
      if main:
        atomic_write_text(os.path.join(out, "progress.jsonl"), "\n".join(progress_lines) + "\n")

    compiles0 = edit_lib.compile_count()
    # Edits go to the editor in chunks (up to the next --eval-every point): blocks of edits with no
    # host sync per edit; the losses are checked when a chunk's info arrives.
    book, immediate, edit_s = edit_common.edit_in_chunks(
        editor, book, records, args, main, between=rescore if args.eval_every else None)

    # Every process: the gather is collective; process 0 writes.
    export.save_codebook(os.path.join(out or args.out, "codebook"), book, settings,
                         extra={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data)})
    scores = _score(records, tokenizer, model, book, settings, generate, batch_size, main)
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
        **edit_common.settings_extra(resolved, settings),
        "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
        "compile_count": edit_lib.compile_count() - compiles0,
        "codebook": {"rows": int(book.count), "capacity": book.capacity, "bytes": book.nbytes()},
        "continued_from": args.codebook,
    }
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores, extra)
  print(edit_common.summary_line(
      args.method, len(records), scores,
      f"{imm['added']} new keys, {edit_s:.1f} s, ES right after each edit {imm['edit_acc']:.3f}",
      args.out))
  return 0
