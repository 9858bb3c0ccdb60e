"""Addressing linear modules of the param tree by their Hugging Face names."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from horse_jax.errors import UserError
from horse_jax.models import registry
from horse_jax.models.config import ModelConfig


def module_names(cfg: ModelConfig) -> list[str]:
  """Every addressable linear module, in config (layer) order."""
  arch = registry.get(cfg.model_type)
  names = [f"{arch.layer_prefix}.{i}.{suffix}" for i in range(cfg.num_layers)
           for suffix in arch.linear_modules]
  if not cfg.tie_word_embeddings:
    names.append("lm_head")
  return names


def default_edit_modules(cfg: ModelConfig, count: int = 6) -> list[str]:
  """The MLP down-projections of the last `count` layers (the HORSE/MALMEN default)."""
  arch = registry.get(cfg.model_type)
  first = max(cfg.num_layers - count, 0)
  return [f"{arch.layer_prefix}.{i}.{arch.edit_module}" for i in range(first, cfg.num_layers)]


def default_codebook_module(cfg: ModelConfig, layer: int) -> str:
  """The module HoReN/GRACE wrap in decoder layer `layer` (the MLP output projection, or what the
  architecture declares instead, e.g. the attention output for mixture-of-experts MLPs)."""
  arch = registry.get(cfg.model_type)
  return f"{arch.layer_prefix}.{layer}.{arch.codebook_module}"


def layer_index(name: str) -> int:
  """Decoder layer index of a module name (`model.layers.26.mlp.down_proj` -> 26)."""
  parts = name.split(".")
  for i, part in enumerate(parts[:-1]):
    if part in ("layers", "h") and parts[i + 1].isdigit():
      return int(parts[i + 1])
  raise UserError(f"module {name!r} is not inside a decoder layer")


def check_module_names(cfg: ModelConfig, names: Sequence[str], first_layer: int = 0) -> None:
  """Raises UserError naming the first unknown (or skipped) module."""
  known = set(module_names(cfg))
  for name in names:
    if name not in known:
      raise UserError(f"unknown module name {name!r} for model_type {cfg.model_type!r} "
                      f"(e.g. {default_edit_modules(cfg, 1)[0]!r})")
    if name != "lm_head" and layer_index(name) < first_layer:
      raise UserError(f"module {name!r} lies below the layer the forward pass started from "
                      f"({first_layer})")


def get_module(params: dict, name: str) -> dict[str, Any]:
  """The {"kernel", "bias"?} dict of a named linear module."""
  node = params
  for part in name.split("."):
    if not isinstance(node, dict) or part not in node:
      raise UserError(f"module {name!r} not found in the param tree")
    node = node[part]
  return node


def get_kernel(params: dict, name: str) -> jax.Array:
  """Kernel [d_in, d_out] of a named linear module."""
  return get_module(params, name)["kernel"]


def replace_kernels(params: dict, kernels: dict[str, jax.Array]) -> dict:
  """A new param tree with the given kernels swapped in (other leaves are shared, not copied)."""
  def rebuild(node, path):
    if not isinstance(node, dict):
      return node
    out = {}
    for key, child in node.items():
      child_path = f"{path}.{key}" if path else key
      if key == "kernel" and path in kernels:
        out[key] = kernels[path]
      else:
        out[key] = rebuild(child, child_path)
    return out
  missing = [n for n in kernels if n not in set(_all_paths(params))]
  if missing:
    raise UserError(f"unknown module name {missing[0]!r}")
  return rebuild(params, "")


def add_to_kernels(params: dict, shifts: dict[str, jax.Array]) -> dict:
  """params with kernel += shift for each named module (shift [d_in, d_out], cast to kernel dtype)."""
  new = {}
  for name, shift in shifts.items():
    kernel = get_kernel(params, name)
    new[name] = (kernel.astype(jax.numpy.float32) + shift).astype(kernel.dtype)
  return replace_kernels(params, new)


def _all_paths(node, path=""):
  if isinstance(node, dict):
    if "kernel" in node:
      yield path
    for key, child in node.items():
      yield from _all_paths(child, f"{path}.{key}" if path else key)
