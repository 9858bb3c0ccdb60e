"""The one registry of model architectures: adding an architecture touches one module.

Generic code (the forward-pass driver in `transformer.py`, lazy HF loading and export in `hf_io.py`,
hooks, generation, mesh helpers) asks this registry what is specific to a model: how its config.json
reads, which tensors it has and how they are named, how a decoder layer computes, which linear
modules editors may address, and how its weights split over a mesh.

What an architecture module (e.g. `horse_jax/models/llama.py`) must provide: build one
`Architecture` and pass it to `register` at import time, then add the module's name to
`BUILTIN_MODULES` below (it is imported on the first lookup, so import order never matters). The
fields, with the signatures the generic code calls:

  name: family name, e.g. "llama".
  model_types: the HF `model_type` values this family reads ("llama", "mistral", "qwen2").
  hf_classes: model_type -> the HF class written to `architectures` when a config built in code
    (not read from a config.json) is exported, e.g. {"llama": "LlamaForCausalLM"}.
  parse_config(hf: dict, source: str) -> ModelConfig: the architecture fields of a parsed
    config.json (`config.common_fields` gives the shared ones). Raises `UserError` (naming `source`)
    for options the forward pass does not implement, instead of silently computing something else.
  config_to_hf(cfg) -> dict: the architecture fields of a config.json for a config built in code;
    `config.config_to_hf` adds model_type, architectures, vocab_size, tie_word_embeddings and the
    special token ids.
  embed(params, cfg, input_ids_BxT, positions_BxT, dtype) -> h [B, T, D].
  block(layer_params, cfg, h_BxTxD, positions_BxT, bias_Bx1xTxS, tap, index, cache=None)
    -> (h [B, T, D], new_cache): one decoder layer. Every linear layer goes through
    `tap.linear(<HF module name>, params, x)` so hooks (capture / offsets / adapters) reach it.
    `cache` is None or (k [B, S, G, Dh], v, write_index) and must then be updated in place of slots
    [write_index, write_index + T) (`layers.update_cache`); the new (k, v) is returned.
  head(params, cfg, h_BxTxD, tap) -> logits [B, T, V] (final norm + lm_head or tied embedding).
  layer_prefix: HF prefix of the decoder layers, e.g. "model.layers" (module names are
    f"{layer_prefix}.{i}.{suffix}"; `Architecture.layer_params(params, i)` is the param subtree
    at that path).
  global_rules, layer_rules: the HF name table (`hf_map.Rule` tuples: hf suffix, param suffix, kind,
    param shape fn(cfg), present fn(cfg)); loading, export, random init and shape checks read it.
  linear_modules: per-layer suffixes of the linear modules editors and hooks may address, in
    forward order (e.g. "mlp.down_proj"); an untied `lm_head` is added generically.
  edit_module: suffix of the default module HORSE/MALMEN/MEND edit (the last layers' MLP output).
  codebook_module: suffix of the default module HoReN/GRACE wrap (usually the same as edit_module).
  residual_writers: per-layer suffixes of the linear modules whose output is the last thing their
    layer adds to the residual stream (e.g. "mlp.down_proj"; GPT-J's parallel attention and MLP
    both qualify). The codebook editor adds such a module's edited output after the layer instead
    of rerunning it; an attention projection followed by its layer's MLP must not be listed (the
    MLP sees the change). () = every wrapped module reruns its layer (always correct, slower).
  sharding_rules: ((regex on the dot-joined param path, PartitionSpec), ...), first match wins, no
    match = replicated; a dimension the mesh axis does not divide is replicated (`sharding.spec_for`).
  init_params: optional fn(cfg, key, dtype, std) -> params for random models; None = Normal(0, std)
    for every tensor of the HF table, unit norm scales, zero biases (`init.init_params`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

from horse_jax.errors import UserError

# Modules that register the built-in architectures (imported on the first lookup).
BUILTIN_MODULES = ("horse_jax.models.llama", "horse_jax.models.qwen3", "horse_jax.models.gpt2",
                   "horse_jax.models.gptj", "horse_jax.models.gpt_oss")


class Architecture(NamedTuple):
  """What is specific to one architecture family (see the module docstring for every field)."""

  name: str
  model_types: tuple[str, ...]
  hf_classes: dict[str, str]
  parse_config: Callable[[dict, str], Any]
  config_to_hf: Callable[[Any], dict]
  embed: Callable[..., Any]
  block: Callable[..., Any]
  head: Callable[..., Any]
  layer_prefix: str
  global_rules: tuple
  layer_rules: tuple
  linear_modules: tuple[str, ...]
  edit_module: str
  codebook_module: str
  residual_writers: tuple[str, ...]
  sharding_rules: tuple
  init_params: Callable[..., dict] | None = None

  def layer_params(self, params: dict, index: int) -> dict:
    """The param subtree of decoder layer `index` (at f"{layer_prefix}.{index}")."""
    node = params
    for key in self.layer_prefix.split("."):
      node = node[key]
    return node[str(index)]


_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(arch: Architecture) -> Architecture:
  """Adds an architecture under each of its model types (a later registration replaces one).

  Args:
    arch: the architecture.

  Returns:
    `arch`, so a module can write `ARCH = register(Architecture(...))`.
  """
  for model_type in arch.model_types:
    _REGISTRY[model_type] = arch
  return arch


def _load_builtin() -> None:
  global _loaded
  if not _loaded:
    _loaded = True
    for module in BUILTIN_MODULES:
      importlib.import_module(module)


def get(model_type: str, source: str | None = None) -> Architecture:
  """The architecture of a HF `model_type`.

  Args:
    model_type: e.g. "qwen2".
    source: where the model type came from (a config.json path), for the error message.

  Raises:
    UserError: the model type is not registered.
  """
  _load_builtin()
  if model_type not in _REGISTRY:
    where = f"{source}: " if source else ""
    raise UserError(f"{where}unsupported model_type {model_type!r} "
                    f"(supported: {', '.join(model_types())})")
  return _REGISTRY[model_type]


def model_types() -> tuple[str, ...]:
  """Every registered HF model type, in registration order."""
  _load_builtin()
  return tuple(_REGISTRY)


def architectures() -> tuple[Architecture, ...]:
  """Every registered architecture once, in registration order."""
  _load_builtin()
  return tuple({id(a): a for a in _REGISTRY.values()}.values())
