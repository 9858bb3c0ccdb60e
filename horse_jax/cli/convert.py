"""`horse-jax info` and `horse-jax convert`: inspect a checkpoint; re-export it (dtype, sharding).

`convert` loads a Hugging Face checkpoint with horse-jax and writes it back with `save_pretrained`:
a check that horse-jax reads a checkpoint completely, and a way to change its dtype or file sharding.
"""

from __future__ import annotations

import json
from pathlib import Path

from horse_jax.errors import UserError


def register(sub) -> None:
  p = sub.add_parser("info", help="show a checkpoint's architecture, size and model card, or whether "
                                  "an output folder is finished")
  p.add_argument("model", help="Hugging Face checkpoint folder (weights optional), a model card name, "
                               "or a horse-jax output folder")
  p.add_argument("--json", action="store_true", help="print JSON instead of text")
  p.set_defaults(func=run_info)
  p = sub.add_parser("convert", help="re-export a checkpoint (change dtype or shard size)")
  p.add_argument("model", help="Hugging Face checkpoint folder to read")
  p.add_argument("out", help="output folder (written atomically; an existing one is refused unless "
                             "--overwrite)")
  from horse_jax.cli.common import add_dtype_arg, add_overwrite_arg
  add_dtype_arg(p, "of the output tensors; default as declared by the input config")
  add_overwrite_arg(p)
  p.add_argument("--max-shard-size", default="5GB",
                 help="split the weights into files of at most this size, e.g. 2GB, 500MB")
  p.set_defaults(func=run_convert)


# Files that mark a horse-jax output folder (as opposed to a checkpoint).
OUTPUT_MARKS = ("metrics.json", "run.json", "results.json", "deltas.safetensors", "bench.json",
                "world.json", "codebook", "hypernet", "checkpoints", "metrics.jsonl")


def _output_summary(path: str) -> dict | None:
  """Status of a horse-jax output folder (finished when its manifest says so), else None."""
  from horse_jax import outputs
  folder = Path(path)
  manifest = outputs.read_manifest(folder)
  if manifest is None and not any((folder / name).exists() for name in OUTPUT_MARKS):
    return None
  status = "finished" if manifest else ("partial (no finished manifest: interrupted, still running, "
                                        "or written by an older version)")
  if manifest is None and (folder / "world.json").is_file():  # the shipped world predates manifests
    status = "world folder without a manifest (`horse-jax world info --dir DIR` describes it)"
  info = {"output": str(folder), "status": status,
          "command": (manifest or {}).get("command"), "method": (manifest or {}).get("method"),
          "files": sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))}
  if (folder / "model" / "config.json").is_file():
    info["model"] = _summary(str(folder / "model"))
  return info


def _card_summary(name: str) -> dict:
  """A model card name: its shipped config's summary, else the card alone."""
  from horse_jax.models.cards import card_for
  from horse_jax.plan import resolve_model_path
  try:
    return _summary(resolve_model_path(name))
  except UserError:
    card = card_for(name)
  if not card:
    raise UserError(f"{name}: neither a folder nor a model card name (`ls models/` lists the cards)")
  return {"card": card["name"], "config": "none shipped (give a checkpoint folder for the architecture)",
          "dtype": card.get("dtype"), "edit_modules": card.get("edit_modules"),
          "horen": card.get("horen")}


def _summary(path: str) -> dict:
  import numpy as np
  from safetensors import safe_open
  from horse_jax.models import hf_io, hf_map
  from horse_jax.models.cards import card_for
  cfg = hf_io.read_config(path)
  n_params = sum(int(np.prod(e.shape)) for e in hf_map.entries(cfg))
  card = card_for(path, cfg)
  folder = Path(path)
  files = sorted(p.name for p in folder.glob("*.safetensors"))
  stored = "none (config only)"
  if files:
    with safe_open(str(folder / files[0]), framework="np") as f:
      stored = f.get_slice(next(iter(f.keys()))).get_dtype() if f.keys() else "?"
  return {
      "model_type": cfg.model_type, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "heads": cfg.num_heads,
      "kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size, "parameters": n_params,
      "stored_dtype": stored, "files": files, "card": card["name"],
      "edit_modules": card["edit_modules"], **_horen_settings(path, cfg),
  }


def _horen_settings(path: str, cfg) -> dict:
  """HoReN's wrapped layer and match threshold on this checkpoint (card, else defaults), by their
  setting names."""
  from horse_jax.editors.codebook.settings import from_resolved
  from horse_jax.settings import resolve_for_model
  editor = from_resolved(resolve_for_model("horen", path, cfg), cfg)
  return {"editor.layer": editor.layer,
          "editor.hopfield_key_match_threshold": editor.hopfield_key_match_threshold}


def run_info(args) -> int:
  path = Path(args.model)
  if path.is_dir():
    info = _output_summary(args.model) if not (path / "config.json").is_file() else None
    info = info or _summary(args.model)
  else:
    info = _card_summary(args.model)
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  _print_fields(info)
  return 0


def _print_fields(info: dict, indent: str = "") -> None:
  for key, value in info.items():
    if value is None:
      continue
    if isinstance(value, dict):
      print(f"{indent}{key}:")
      _print_fields(value, indent + "  ")
    else:
      text = (", ".join(value) or "-") if isinstance(value, list) else value
      print(f"{indent}{key:36s} {text}")


def run_convert(args) -> int:
  from horse_jax import outputs
  outputs.prepare_output(args.out, inputs={"MODEL": args.model}, overwrite=args.overwrite, flag="OUT")
  import jax.numpy as jnp
  from horse_jax.models import from_pretrained, save_pretrained
  from horse_jax.models.hf_io import TOKENIZER_FILES
  from horse_jax.cli.common import max_shard_size_arg
  limit = max_shard_size_arg(args.max_shard_size)  # a bad size fails before the model loads
  model = from_pretrained(args.model, dtype=args.dtype or jnp.float32)
  has_tokenizer = any((Path(args.model) / name).is_file() for name in TOKENIZER_FILES)
  save_pretrained(model, args.out, tokenizer_src=args.model if has_tokenizer else None,
                  dtype=args.dtype, max_shard_size=limit)
  print(f"wrote {args.out}")
  return 0
