"""`horse-jax edit --method rome|memit|alphaedit`: locate-then-edit, one request after another.

Computes (or reads from `editor.stats_dir`) the second-moment statistics C of the edited modules over
--stats-corpus (default: the world's pre-training text), then edits the records in order, each on
the model the earlier ones left. Writes to --out (built beside it and swapped in whole at the end;
horse-jax.json, written last, marks it finished):
  deltas.safetensors  float32 edited - original, one tensor per edited HF weight, HF layout
  model/              the edited checkpoint (save_pretrained; loads in transformers)
  metrics.json        post-edit scores (pre-edit model as reference), effective_settings, each
                      edit's target loss and Adam steps, and AlphaEdit's null-space dimensions
"""

from __future__ import annotations

import os

import jax



def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits in sequence, writes and scores; `mesh`/`fsdp` come from `common.setup_devices`."""
  from horse_jax import distributed, outputs, progress
  from horse_jax.cli import edit_common
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  edit_common.require_model(args.model)
  resolved = edit_common.resolve(args, read_config(args.model))
  model, tokenizer, records = edit_common.load(args, resolved, mesh, fsdp)
  main = distributed.is_main()
  with progress.stage("second-moment statistics"):
    editor = protocol.make_editor(args.method, model, tokenizer, resolved, mesh=mesh,
                                  progress=main and progress.bars_enabled(),
                                  stats_corpus=args.stats_corpus)
  dims = editor.config.null_dims
  if dims and any(d == editor.config.covs[m].shape[0] for m, d in dims.items()):
    progress.log(f"alphaedit: every eigenvalue of C is below nullspace_threshold at "
                 f"{', '.join(m for m, d in dims.items() if d == editor.config.covs[m].shape[0])}: "
                 "the projector P is the identity there")
  state = editor.init(jax.random.PRNGKey(args.seed))
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    # One request per call (the editor takes one per step anyway), so the bar moves per edit.
    state, infos, edit_s = edit_common.edit_in_chunks(editor, state, records, args, main, chunk=1,
                                                      loss_key="z_loss", setting="editor.v_lr")
    edited = editor.apply(state)
    jax.block_until_ready(edited.model.params)
    scores = edit_common.write_and_score(out, args, model, tokenizer, records, edited.model,
                                         editor.config.modules, edited.logits,
                                         resolved["eval.batch_size"], main)
    if not main:
      return 0
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores,
                  extra={**edit_common.settings_extra(resolved), "edit_seconds": edit_s,
                         "edit_modules": list(editor.config.modules),
                         "stats_corpus": args.stats_corpus or "the world's pre-training text",
                         "null_space_dims": dims,
                         "targets": [{k: v for k, v in x.items() if k != "index"} for x in infos]})
  print(edit_common.summary_line(args.method, len(records), scores, f"{edit_s:.1f} s", args.out))
  return 0
