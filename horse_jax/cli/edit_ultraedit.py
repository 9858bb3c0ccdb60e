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

from horse_jax.cli.common import max_shard_size
from horse_jax.errors import UserError


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits, writes and scores; `mesh`/`fsdp` come from `common.setup_devices` (None: one device)."""
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

    with progress.stage("writing the edited model"):  # every process: the gather is collective
      export.save_edit(out, model, edited, cfg.modules, tokenizer_src=args.model,
                       max_shard_size=max_shard_size(args))

    gen = pre_gen = None
    if args.eval_mode == "generate":
      gen, pre_gen = runtime.generate_fn(edited), runtime.generate_fn(model)
    with progress.stage(f"scoring {len(records)} edits"):
      scores = score_records(records, tokenizer, runtime.logits_fn(edited), runtime.logits_fn(model),
                             generate_fn=gen, pre_generate_fn=pre_gen,
                             max_length=model.config.max_position_embeddings,
                             progress=main and progress.bars_enabled())
    if not main:
      return 0
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores,
                  extra={"scoring": {"summary": "all edits scored on the final model"},
                         "settings": resolved.tree(), "effective_settings": resolved.effective(),
                         "ignored_settings": resolved.ignored, "edit_seconds": edit_s,
                         "edit_steps": n_steps, "edit_modules": list(cfg.modules)})
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits in {n_steps} steps ({edit_s:.1f} s)  ES "
        f"{s.get('edit_acc')}  GS {s.get('rephrase_acc')}  loc_acc {s.get('loc_acc')}  loc_agree "
        f"{s.get('loc_agree')}  -> {args.out}")
  return 0
