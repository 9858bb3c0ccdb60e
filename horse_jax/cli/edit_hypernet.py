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

from horse_jax.cli.common import max_shard_size
from horse_jax.errors import UserError


def resolve(method: str, model_path: str, config, config_files=(), overrides=(), dtype: str | None = None):
  """The run's `horse_jax.settings.Resolved`: defaults <- model card <- --config files <- --set
  (--dtype, when given, is the command line's model.dtype)."""
  from horse_jax.editors import protocol
  if isinstance(config_files, str):
    config_files = [config_files]
  resolved = protocol.resolve_settings(method, model_path, config, configs=list(config_files or ()),
                                       overrides=overrides)
  if dtype:
    resolved.values["model.dtype"], resolved.sources["model.dtype"] = dtype, "set"
  return resolved


def hypernet_choice(args) -> tuple[str | None, dict[str, Any]]:
  """(folder to load or None for a fresh network, what metrics.json records about it)."""
  if args.hypernet == "init":
    return None, {"kind": "initialised", "seed": args.seed}
  if not os.path.isdir(args.hypernet):
    raise UserError(f"--hypernet {args.hypernet}: folder not found")
  return args.hypernet, {"kind": "trained", "folder": os.path.abspath(args.hypernet)}


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits, writes and scores; `mesh`/`fsdp` come from `common.setup_devices` (None: one device)."""
  from horse_jax import distributed, export, outputs, progress, runtime
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import score_records, write_metrics
  from horse_jax.models import read_config

  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  folder, network = hypernet_choice(args)
  resolved = resolve(args.method, args.model, read_config(args.model), args.config or (),
                     args.overrides, args.dtype)
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
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
                  extra={"settings": resolved.tree(), "effective_settings": resolved.effective(),
                         "ignored_settings": resolved.ignored, "hypernet": network,
                         "edit_seconds": edit_s, "edit_modules": list(cfg.modules),
                         "lm_batch": cfg.lm_batch})
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits  ES {s.get('edit_acc')}  GS {s.get('rephrase_acc')}  "
        f"loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}  -> {args.out}")
  return 0
