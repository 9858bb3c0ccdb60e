"""`horse-jax edit --method horse|malmen|mend`: all edits at once with a (trained or fresh) hypernetwork.

Writes to --out:
  deltas.safetensors  float32 edited - original, one tensor per edited HF weight, HF layout
  model/              the edited checkpoint (save_pretrained; loads in transformers)
  metrics.json        post-edit scores (pre-edit model as reference) via horse_jax.eval.scoring
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax import config as config_lib
from horse_jax.editors import hypernet
from horse_jax.editors.hypernet.checkpoint import load_for_editing
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_bytes


def model_defaults(model_path: str, model) -> dict[str, Any]:
  """Per-model settings from its card (when the cards module exists) else the architecture default."""
  card: dict[str, Any] = {}
  try:
    from horse_jax.models.cards import card_for
    card = dict(card_for(model_path, model.config) or {})
  except ModuleNotFoundError:
    pass
  except UserError:
    card = {}
  mods = card.get("edit_modules") or hypernet_modules_default(model)
  return {"model": {"edit_modules": list(mods)}, "dtype": card.get("dtype")}


def hypernet_modules_default(model):
  from horse_jax.models.names import default_edit_modules
  return default_edit_modules(model.config)


def resolve_settings(method: str, model_path: str, model, config_file, overrides) -> dict[str, Any]:
  """defaults(method, model card) <- --config YAML <- --set overrides."""
  defaults = hypernet.default_settings(method)
  defaults["model"]["edit_modules"] = model_defaults(model_path, model)["model"]["edit_modules"]
  return config_lib.resolve(defaults, config_file, overrides)


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
  from horse_jax.models.names import get_kernel
  by_path = {e.path: e for e in hf_map.entries(original.config)}
  out = {}
  for name in modules:
    entry = by_path.get(f"{name}.kernel")
    if entry is None:
      raise UserError(f"module {name!r} has no Hugging Face weight in the name table")
    delta = (np.asarray(get_kernel(edited.params, name), np.float32)
             - np.asarray(get_kernel(original.params, name), np.float32))
    out[entry.hf_name] = np.ascontiguousarray(delta.T if entry.kind == hf_map.LINEAR else delta)
  return out


def explicit_lm_batch(config_file, overrides) -> int | None:
  """`data.batch_size` when the user set it (--config or --set), else None (a trained hypernetwork
  then keeps the LM mini-batch it was trained with; see `checkpoint.load_for_editing`)."""
  given = config_lib.resolve({"data": {"batch_size": None}}, config_file,
                             [o for o in overrides if o.startswith("data.batch_size")])
  size = (given.get("data") or {}).get("batch_size")
  return None if size is None else int(size)


def editor_for(args, settings, model):
  """(cfg, state): the trained hypernetwork from --hypernet, else a fresh one."""
  if args.hypernet:
    return load_for_editing(args.hypernet, args.method, model, settings["editor"]["batch_size"],
                            explicit_lm_batch(args.config, args.overrides), f"--hypernet {args.hypernet}")
  cfg = hypernet.from_settings(args.method, settings, model)
  return cfg, hypernet.init(cfg, jax.random.PRNGKey(args.seed))


def run(args) -> int:
  from horse_jax.data.loaders import load_records
  from horse_jax.eval.scoring import score_records, write_metrics
  from horse_jax.models import save_pretrained
  import safetensors.numpy

  model, tokenizer = load_model(args.model, args.dtype or card_dtype(args.model))
  settings = resolve_settings(args.method, args.model, model, args.config, args.overrides)
  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  cfg, state = editor_for(args, settings, model)
  t0 = time.time()
  batches = hypernet.edit_batches(tokenizer, records, cfg.lm_batch, settings["data"].get("max_length"))
  shifts, state = hypernet.edit(state, model, cfg, batches, progress=True)
  edited = hypernet.apply(model, shifts)
  jax.block_until_ready(edited.params)
  edit_s = time.time() - t0

  os.makedirs(args.out, exist_ok=True)
  deltas = hf_deltas(model, edited, cfg.modules)
  atomic_write_bytes(os.path.join(args.out, "deltas.safetensors"), safetensors.numpy.save(deltas))
  save_pretrained(edited, os.path.join(args.out, "model"), tokenizer_src=args.model)

  gen = pre_gen = None
  if args.eval_mode == "generate":
    from horse_jax.models import generate
    gen = lambda ids, mask, n: generate(edited, ids, mask, n)
    pre_gen = lambda ids, mask, n: generate(model, ids, mask, n)
  scores = score_records(records, tokenizer, logits_fn(edited), logits_fn(model),
                         generate_fn=gen, pre_generate_fn=pre_gen,
                         max_length=model.config.max_position_embeddings)
  write_metrics(os.path.join(args.out, "metrics.json"), args.method, len(records), scores,
                extra={"settings": settings, "hypernet": args.hypernet, "edit_seconds": edit_s,
                       "edit_modules": list(cfg.modules)})
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits  ES {s.get('edit_acc')}  GS {s.get('rephrase_acc')}  "
        f"loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}  -> {args.out}")
  return 0
