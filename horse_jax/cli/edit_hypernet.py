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
import jax.numpy as jnp
import numpy as np

from horse_jax.errors import UserError
from horse_jax.io import atomic_write_bytes


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


def resolve_settings(method: str, model_path: str, model, config_file, overrides) -> dict[str, Any]:
  """The resolved settings as a reference-named tree (model.edit_modules filled in)."""
  tree = resolve(method, model_path, model, config_file or (), overrides).tree()
  if not tree["model"].get("edit_modules"):
    from horse_jax.models.names import default_edit_modules
    tree["model"]["edit_modules"] = list(default_edit_modules(getattr(model, "config", model)))
  return tree


def card_dtype(path: str) -> str | None:
  """The LM dtype the model card asks for (None when there is no card)."""
  try:
    from horse_jax.models import read_config
    from horse_jax.models.cards import card_for
    return card_for(path, read_config(path)).get("dtype")
  except (ModuleNotFoundError, UserError):
    return None


def load_model(path: str, dtype: str | None = None):
  """(model, tokenizer) from a Hugging Face folder; dtype default float32. Sharded over the mesh of
  the running command's --mesh (`horse_jax.distributed.cli_mesh`), each device reading its slices."""
  from horse_jax import distributed
  from horse_jax.models import from_pretrained, load_tokenizer
  if not os.path.isdir(path):
    raise UserError(f"--model {path!r}: folder not found")
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
        None: jnp.float32}.get(dtype, jnp.float32)
  model = from_pretrained(path, dtype=dt, mesh=distributed.cli_mesh(), fsdp=distributed.cli_fsdp())
  return model, load_tokenizer(path)


@jax.jit
def _logits(model, input_ids, attention_mask):
  from horse_jax.models import apply
  return apply(model, input_ids, attention_mask)


def logits_fn(model):
  """EditBatch -> logits (one compile per shape, shared by every model with the same config)."""
  return lambda batch: _logits(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))


def hf_deltas(original, edited, modules) -> dict[str, np.ndarray]:
  """float32 edited - original per edited weight, keyed by HF tensor name, in HF layout."""
  from horse_jax.models import hf_map
  from horse_jax.distributed import to_host
  from horse_jax.models.names import get_kernel
  by_path = {e.path: e for e in hf_map.entries(original.config)}
  out = {}
  for name in modules:
    entry = by_path.get(f"{name}.kernel")
    if entry is None:
      raise UserError(f"module {name!r} has no Hugging Face weight in the name table")
    delta = (to_host(get_kernel(edited.params, name)).astype(np.float32)
             - to_host(get_kernel(original.params, name)).astype(np.float32))
    out[entry.hf_name] = np.ascontiguousarray(delta.T if entry.kind == hf_map.LINEAR else delta)
  return out


def hypernet_choice(args) -> tuple[str | None, dict[str, Any]]:
  """(folder to load or None for a fresh network, what metrics.json records about it)."""
  if args.hypernet == "init":
    return None, {"kind": "initialised", "seed": args.seed}
  if not os.path.isdir(args.hypernet):
    raise UserError(f"--hypernet {args.hypernet}: folder not found")
  return args.hypernet, {"kind": "trained", "folder": os.path.abspath(args.hypernet)}


def run(args) -> int:
  from horse_jax import outputs, progress
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import protocol
  from horse_jax.eval.scoring import score_records, write_metrics
  from horse_jax.models import read_config, save_pretrained
  import safetensors.numpy

  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  folder, network = hypernet_choice(args)
  resolved = resolve(args.method, args.model, read_config(args.model), args.config or (),
                     args.overrides, args.dtype)
  with progress.stage("loading model"):
    model, tokenizer = load_model(args.model, resolved["model.dtype"])
  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  from horse_jax import distributed
  main = distributed.is_main()  # multi-host: every process computes, process 0 writes and prints
  editor = protocol.make_editor(args.method, model, tokenizer, resolved, hypernet=folder,
                                progress=main and progress.bars_enabled(), mesh=distributed.cli_mesh())
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

    deltas = hf_deltas(model, edited, cfg.modules)
    saved = edited
    if jax.process_count() > 1:  # gather on every process (a collective), then process 0 writes
      saved = edited.__class__(distributed.tree_to_host(edited.params), edited.config)
    if main:
      with progress.stage("writing the edited model"):
        atomic_write_bytes(os.path.join(out, "deltas.safetensors"), safetensors.numpy.save(deltas))
        save_pretrained(saved, os.path.join(out, "model"), tokenizer_src=args.model)

    gen = pre_gen = None
    if args.eval_mode == "generate":
      gen, pre_gen = protocol.model_generate(edited), protocol.model_generate(model)
    with progress.stage(f"scoring {len(records)} edits"):
      scores = score_records(records, tokenizer, logits_fn(edited), logits_fn(model),
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
