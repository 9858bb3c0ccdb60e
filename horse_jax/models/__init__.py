"""Flax-free, pure-JAX language models with Hugging Face checkpoint loading and export.

Public surface:
  from_pretrained(path, dtype=jnp.float32, mesh=None) -> Model
  save_pretrained(model, path, tokenizer_src=None), load_tokenizer(path)
  apply(model, input_ids, attention_mask=None, hooks=None) -> logits [B, T, V]
  forward(...) -> ForwardOutput(logits, captured)
  generate(model, input_ids, attention_mask, max_new_tokens, hooks=None) -> new tokens [B, N]
  Hooks(capture=..., offsets=..., adapters=...)  named-module hooks for editors
  make_mesh(data, model), shard_params(params, cfg, mesh)  tensor-parallel sharding
"""

from horse_jax.models.config import ModelConfig, config_from_hf, config_to_hf
from horse_jax.models.generate import generate
from horse_jax.models.hf_io import from_pretrained, load_tokenizer, read_config, save_pretrained
from horse_jax.models.hooks import Hooks
from horse_jax.models.names import (add_to_kernels, default_edit_modules, get_kernel, layer_index,
                                    module_names, replace_kernels)
from horse_jax.models.sharding import make_mesh, shard_model, shard_params
from horse_jax.models.transformer import (ForwardOutput, Model, apply, forward, forward_from,
                                          hidden_before)
