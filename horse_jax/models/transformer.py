"""The pure forward pass shared by every architecture, split so editors can reuse partial results.

`forward = head(run_layers(embed(ids)))`. The layers below the lowest edited module never change
during an edit, so editors run `run_layers(..., stop=l)` once and then `run_layers(..., start=l)` many
times (see `hidden_before` / `forward_from`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from horse_jax.models import gpt2, gptj, layers, llama
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Hooks, Tap

ARCHS: dict[str, Any] = {"llama": llama, "mistral": llama, "qwen2": llama, "gpt2": gpt2,
                         "gptj": gptj}


def register_arch(model_type: str, module: Any) -> None:
  """Adds an architecture module (embed / block / head / layer_params / LAYER_PREFIX)."""
  ARCHS[model_type] = module


def arch(cfg: ModelConfig):
  return ARCHS[cfg.model_type]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
  """A language model: static config plus a param pytree (nested dicts keyed by HF module names)."""

  params: dict
  config: ModelConfig = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    return jax.tree_util.tree_leaves(self.params)[0].dtype


class ForwardOutput(NamedTuple):
  logits: jax.Array  # [B, T, V]
  captured: dict[str, jax.Array]  # module name -> input [B, T, d_in]


def default_positions(attention_mask_BxT: jax.Array) -> jax.Array:
  """Position ids that start at 0 on the first real token (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=-1) - 1, 0).astype(jnp.int32)


def _mask_and_positions(input_ids_BxT, attention_mask_BxT, position_ids_BxT):
  if attention_mask_BxT is None:
    attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
  if position_ids_BxT is None:
    position_ids_BxT = default_positions(attention_mask_BxT)
  return attention_mask_BxT, position_ids_BxT


def embed(model: Model, input_ids_BxT, position_ids_BxT) -> jax.Array:
  return arch(model.config).embed(model.params, model.config, input_ids_BxT, position_ids_BxT,
                                  model.dtype)


def run_layers(model: Model, h_BxTxD, attention_mask_BxT, position_ids_BxT, tap: Tap,
               start: int = 0, stop: int | None = None) -> jax.Array:
  """Runs decoder layers [start, stop) over hidden states (no cache)."""
  cfg = model.config
  mod = arch(cfg)
  t = h_BxTxD.shape[1]
  slots = jnp.broadcast_to(jnp.arange(t), attention_mask_BxT.shape)
  bias = layers.attention_bias(slots, jnp.arange(t), attention_mask_BxT, cfg.sliding_window)
  stop = cfg.num_layers if stop is None else stop
  for i in range(start, stop):
    h_BxTxD, _ = mod.block(mod.layer_params(model.params, i), cfg, h_BxTxD, position_ids_BxT, bias,
                           tap, i)
  return h_BxTxD


def _check_names(model: Model, tap: Tap, hooks: Hooks | None, start: int) -> None:
  if hooks is None:
    return
  unknown = hooks.names() - tap.seen
  if unknown:
    from horse_jax.models.names import check_module_names
    check_module_names(model.config, sorted(unknown), first_layer=start)


def forward(model: Model, input_ids_BxT, attention_mask_BxT=None, *, hooks: Hooks | None = None,
            position_ids_BxT=None) -> ForwardOutput:
  """Full forward pass with optional named-module hooks.

  Args:
    model: the model.
    input_ids_BxT: token ids [B, T] (int).
    attention_mask_BxT: 1 for real tokens, 0 for padding (left or right); default all ones.
    hooks: capture / offset / adapter hooks at named linear modules.
    position_ids_BxT: default counts real tokens from 0, so left padding needs nothing else.

  Returns:
    ForwardOutput(logits [B, T, V], captured inputs by module name).
  """
  mask, positions = _mask_and_positions(input_ids_BxT, attention_mask_BxT, position_ids_BxT)
  tap = Tap(hooks)
  h = embed(model, input_ids_BxT, positions)
  h = run_layers(model, h, mask, positions, tap)
  logits = arch(model.config).head(model.params, model.config, h, tap)
  _check_names(model, tap, hooks, 0)
  return ForwardOutput(logits, tap.captured)


def apply(model: Model, input_ids_BxT, attention_mask_BxT=None, *, hooks: Hooks | None = None,
          position_ids_BxT=None) -> jax.Array:
  """Logits [B, T, V] of `forward`."""
  return forward(model, input_ids_BxT, attention_mask_BxT, hooks=hooks,
                 position_ids_BxT=position_ids_BxT).logits


def hidden_before(model: Model, layer: int, input_ids_BxT, attention_mask_BxT=None,
                  position_ids_BxT=None) -> jax.Array:
  """Residual stream entering decoder layer `layer` [B, T, D] (no hooks: it is edit-invariant)."""
  mask, positions = _mask_and_positions(input_ids_BxT, attention_mask_BxT, position_ids_BxT)
  h = embed(model, input_ids_BxT, positions)
  return run_layers(model, h, mask, positions, Tap(None), 0, layer)


def forward_from(model: Model, layer: int, h_BxTxD, attention_mask_BxT, *,
                 hooks: Hooks | None = None, position_ids_BxT=None) -> ForwardOutput:
  """Finishes a forward pass from the residual stream entering `layer` (see `hidden_before`)."""
  if position_ids_BxT is None:
    position_ids_BxT = default_positions(attention_mask_BxT)
  tap = Tap(hooks)
  h = run_layers(model, h_BxTxD, attention_mask_BxT, position_ids_BxT, tap, layer)
  logits = arch(model.config).head(model.params, model.config, h, tap)
  _check_names(model, tap, hooks, layer)
  return ForwardOutput(logits, tap.captured)
