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
import time

import jax
import numpy as np

from horse_jax.cli.common import max_shard_size
from horse_jax.errors import UserError


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits in sequence, writes and scores; `mesh`/`fsdp` come from `common.setup_devices`."""
  from horse_jax import distributed, export, outputs, progress, runtime
  from horse_jax.cli.edit_hypernet import resolve
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import score_records, write_metrics
  from horse_jax.models import read_config

  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  resolved = resolve(args.method, args.model, read_config(args.model), args.config or (),
                     args.overrides, args.dtype)
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
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
    bar = progress.bar(total=len(records), desc=f"{args.method} edits", unit="edit", disable=not main)
    t0 = time.time()
    infos = []
    for record in records:  # one request per step (the bar moves per edit)
      state, info = editor.edit(state, [record])
      infos += info
      bar.update(1)
    edited = editor.apply(state)
    jax.block_until_ready(edited.model.params)
    edit_s = time.time() - t0
    bar.close()
    if not progress.bars_enabled():
      progress.log(f"{args.method}: {len(records)} sequential edits: {edit_s:.1f} s")
    bad = [i for i, x in enumerate(infos) if not np.isfinite(x["z_loss"])]
    if bad:
      raise UserError(f"{args.data}: record {bad[0]}: the target loss became {infos[bad[0]]['z_loss']} "
                      "(lower editor.v_lr)")
    with progress.stage("writing the edited model"):
      export.save_edit(out, model, edited.model, list(editor.config.modules), tokenizer_src=args.model,
                       max_shard_size=max_shard_size(args))
    gen = pre_gen = None
    if args.eval_mode == "generate":
      gen, pre_gen = runtime.generate_fn(edited.model), runtime.generate_fn(model)
    with progress.stage(f"scoring {len(records)} edits"):
      scores = score_records(records, tokenizer, edited.logits, runtime.logits_fn(model),
                             batch_size=int(resolved["eval.batch_size"]), generate_fn=gen,
                             pre_generate_fn=pre_gen, max_length=model.config.max_position_embeddings,
                             progress=main and progress.bars_enabled())
    if not main:
      return 0
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores,
                  extra={"settings": resolved.tree(), "effective_settings": resolved.effective(),
                         "ignored_settings": resolved.ignored, "edit_seconds": edit_s,
                         "edit_modules": list(editor.config.modules),
                         "stats_corpus": args.stats_corpus or "the world's pre-training text",
                         "null_space_dims": dims, "targets": infos})
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits ({edit_s:.1f} s)  ES {s.get('edit_acc')}  "
        f"GS {s.get('rephrase_acc')}  loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}"
        f"  -> {args.out}")
  return 0
