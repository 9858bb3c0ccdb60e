"""`horse-jax edit --method ultraedit`: training-free edits, step after step of `editor.batch_size`
requests, each step's weight shifts computed on the model as the steps before left it.

Writes to --out (built beside it and swapped in whole at the end; horse-jax.json, written last,
marks it finished):
  deltas.safetensors  float32 edited - original, one tensor per edited HF weight, HF layout
  model/              the edited checkpoint (save_pretrained; loads in transformers)
  metrics.json        every edit scored on the final model (pre-edit model as reference), with
                      effective_settings: every setting's value and source (default, card, config,
                      set), the edit steps and their time
"""

from __future__ import annotations

import os
import time

import jax




def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits, writes and scores; `mesh`/`fsdp` come from `common.setup_devices` (None: one device)."""
  from horse_jax import distributed, outputs, progress
  from horse_jax.cli import edit_common
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  edit_common.require_model(args.model)
  resolved = edit_common.resolve(args, read_config(args.model))
  model, tokenizer, records = edit_common.load(args, resolved, mesh, fsdp)
  main = distributed.is_main()  # multi-host: every process computes, process 0 writes and prints
  editor = protocol.make_editor(args.method, model, tokenizer, resolved, mesh=mesh)
  cfg = editor.config
  step = int(resolved["editor.batch_size"])
  n_steps = -(-len(records) // step)
  state = editor.init(jax.random.PRNGKey(args.seed))
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    bar = progress.bar(total=len(records), desc=f"{args.method} edits", unit="edit",
                       disable=not main)
    t0 = time.time()
    # A step is one compiled program; the bar advances per step (the device runs ahead of it).
    for start in range(0, len(records), step):
      state, _ = editor.edit(state, records[start:start + step])
      bar.update(min(step, len(records) - start))
    edited = editor.apply(state).model
    jax.block_until_ready(edited.params)
    edit_s = time.time() - t0
    bar.close()
    if not progress.bars_enabled():
      progress.log(f"{args.method}: {len(records)} edits in {n_steps} steps: {edit_s:.1f} s")

    scores = edit_common.write_and_score(out, args, model, tokenizer, records, edited, cfg.modules,
                                         main=main)
    if not main:
      return 0
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores,
                  extra={"scoring": {"summary": "all edits scored on the final model"},
                         **edit_common.settings_extra(resolved), "edit_seconds": edit_s,
                         "edit_steps": n_steps, "edit_modules": list(cfg.modules)})
  print(edit_common.summary_line(args.method, len(records), scores,
                                 f"{n_steps} steps, {edit_s:.1f} s", args.out))
  return 0
