"""`horse-jax edit --method horse|malmen|mend`: all edits at once with a trained hypernetwork (or,
with `--hypernet init`, a freshly initialised one the user asked for).

Writes to --out (built beside it and swapped in whole at the end; horse-jax.json, written last,
marks it finished):
  deltas.safetensors  float32 edited - original, one tensor per edited HF weight, HF layout
  model/              the edited checkpoint (save_pretrained; loads in transformers)
  metrics.json        post-edit scores (pre-edit model as reference) via horse_jax.eval.scoring, with
                      effective_settings: every setting's value and source (default, card, config,
                      set) and "hypernet": {"kind": "trained", "folder"} or
                      {"kind": "initialised", "seed"}
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from horse_jax.errors import UserError


def hypernet_choice(args) -> tuple[str | None, dict[str, Any]]:
  """(folder to load or None for a fresh network, what metrics.json records about it)."""
  if args.hypernet == "init":
    return None, {"kind": "initialised", "seed": args.seed}
  if not os.path.isdir(args.hypernet):
    raise UserError(f"--hypernet {args.hypernet}: folder not found")
  return args.hypernet, {"kind": "trained", "folder": os.path.abspath(args.hypernet)}


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits, writes and scores; `mesh`/`fsdp` come from `common.setup_devices` (None: one device)."""
  from horse_jax import distributed, outputs, progress
  from horse_jax.cli import edit_common
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import write_metrics
  from horse_jax.models import read_config

  edit_common.require_model(args.model)
  folder, network = hypernet_choice(args)
  resolved = edit_common.resolve(args, read_config(args.model))
  model, tokenizer, records = edit_common.load(args, resolved, mesh, fsdp)
  main = distributed.is_main()  # multi-host: every process computes, process 0 writes and prints
  editor = protocol.make_editor(args.method, model, tokenizer, resolved, hypernet=folder,
                                progress=main and progress.bars_enabled(), mesh=mesh)
  cfg = editor.config
  state = editor.init(jax.random.PRNGKey(args.seed))
  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    with progress.stage(f"editing {len(records)} records at once ({args.method})"):
      t0 = time.time()
      state, _ = editor.edit(state, records)
      edited = editor.apply(state).model
      jax.block_until_ready(edited.params)
      edit_s = time.time() - t0

    scores = edit_common.write_and_score(out, args, model, tokenizer, records, edited, cfg.modules,
                                         main=main)
    if not main:
      return 0
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores,
                  extra={**edit_common.settings_extra(resolved), "hypernet": network,
                         "edit_seconds": edit_s, "edit_modules": list(cfg.modules),
                         "lm_batch": cfg.lm_batch})
  print(edit_common.summary_line(args.method, len(records), scores, "", args.out))
  return 0
