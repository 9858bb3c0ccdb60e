"""Flax-free, pure-JAX language models with Hugging Face checkpoint loading and export.

Public surface:
  from_pretrained(path, dtype=jnp.float32, mesh=None) -> Model
  apply(model, input_ids, attention_mask=None, hooks=None) -> logits [B, T, V]
  forward(...) -> ForwardOutput(logits, captured)
  Hooks(capture=..., offsets=..., adapters=...)  named-module hooks for editors
"""

from horse_jax.models.config import ModelConfig, config_from_hf
from horse_jax.models.hooks import Hooks
from horse_jax.models.names import (add_to_kernels, default_edit_modules, get_kernel, layer_index,
                                    module_names, replace_kernels)
from horse_jax.models.transformer import (ForwardOutput, Model, apply, forward, forward_from,
                                          hidden_before)
