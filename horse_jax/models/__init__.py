"""Flax-free, pure-JAX language models with Hugging Face checkpoint loading and export.

Public surface (keyword names follow transformers):
  from_pretrained(path, dtype=jnp.float32, mesh=None) -> Model
  save_pretrained(model, path, tokenizer_src=None), load_tokenizer(path)
  apply(model, input_ids, attention_mask=None, *, position_ids=None, hooks=None) -> logits [B, T, V]
  forward(...) -> ForwardOutput(logits, captured)
  hidden_before(model, layer, input_ids, attention_mask=None, *, position_ids=None) -> [B, T, D]
  forward_from(model, layer, hidden_states, attention_mask=None, *, position_ids=None, hooks=None)
  generate(model, input_ids, attention_mask=None, max_new_tokens=16, hooks=None) -> new tokens [B, N]
  Hooks(capture=..., offsets=..., adapters=...)  named-module hooks for editors
  make_mesh(data, model), shard_params(params, cfg, mesh)  tensor-parallel sharding
  Architecture, register_architecture, supported_model_types  the architecture registry
"""

from horse_jax.models.config import ModelConfig, config_from_hf, config_to_hf
from horse_jax.models.generate import generate
from horse_jax.models.hf_io import from_pretrained, load_tokenizer, read_config, save_pretrained
from horse_jax.models.hooks import Hooks
from horse_jax.models.names import (add_to_kernels, default_codebook_module, default_edit_modules,
                                    get_kernel, layer_index, module_names, replace_kernels)
from horse_jax.models.registry import Architecture
from horse_jax.models.registry import model_types as supported_model_types
from horse_jax.models.registry import register as register_architecture
from horse_jax.models.sharding import make_mesh, shard_model, shard_params
from horse_jax.models.transformer import (ForwardOutput, Model, apply, forward, forward_from,
                                          hidden_before)

__all__ = [
    # Models and checkpoints.
    "Model", "ModelConfig", "from_pretrained", "save_pretrained", "load_tokenizer", "read_config",
    "config_from_hf", "config_to_hf",
    # Forward passes and generation.
    "apply", "forward", "ForwardOutput", "hidden_before", "forward_from", "generate", "Hooks",
    # Addressing linear modules by their HF names.
    "module_names", "default_edit_modules", "default_codebook_module", "layer_index", "get_kernel",
    "replace_kernels", "add_to_kernels",
    # Sharding.
    "make_mesh", "shard_params", "shard_model",
    # Architecture registry.
    "Architecture", "register_architecture", "supported_model_types",
]
