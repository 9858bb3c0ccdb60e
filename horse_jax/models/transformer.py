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

from horse_jax.models import layers, registry
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Hooks, Tap


def arch(cfg: ModelConfig) -> registry.Architecture:
  """The registered architecture of a config (see `registry` for what one provides)."""
  return registry.get(cfg.model_type)


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


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Position ids [B, T] that start at 0 on the first real token (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _mask_and_positions(shape_BxT, attention_mask_BxT, position_ids_BxT):
  if attention_mask_BxT is None:
    attention_mask_BxT = jnp.ones(shape_BxT, jnp.int32)
  if position_ids_BxT is None:
    position_ids_BxT = default_positions(attention_mask_BxT)
  return attention_mask_BxT, position_ids_BxT


def embed(model: Model, input_ids, position_ids) -> jax.Array:
  """Input embeddings [B, T, D] of token ids [B, T] at positions [B, T]."""
  return arch(model.config).embed(model.params, model.config, input_ids, position_ids, model.dtype)


def run_layers(model: Model, hidden_states, attention_mask, position_ids, tap: Tap,
               start: int = 0, stop: int | None = None) -> jax.Array:
  """Runs decoder layers [start, stop) over hidden states [B, T, D] (no cache).

  Args:
    model: the model.
    hidden_states: the residual stream entering layer `start` [B, T, D].
    attention_mask: [B, T], 1 on real tokens.
    position_ids: [B, T].
    tap: applies the hooks of this pass.
    start, stop: layer range; stop defaults to the number of layers.

  Returns:
    The residual stream leaving layer `stop - 1` [B, T, D].
  """
  cfg = model.config
  mod = arch(cfg)
  h_BxTxD = hidden_states
  t = h_BxTxD.shape[1]
  slots_BxT = jnp.broadcast_to(jnp.arange(t), attention_mask.shape)
  bias = layers.attention_bias(slots_BxT, jnp.arange(t), attention_mask, cfg.sliding_window)
  stop = cfg.num_layers if stop is None else stop
  for i in range(start, stop):
    h_BxTxD, _ = mod.block(mod.layer_params(model.params, i), cfg, h_BxTxD, position_ids, bias,
                           tap, i)
  return h_BxTxD


def _check_names(model: Model, tap: Tap, hooks: Hooks | None, start: int) -> None:
  if hooks is None:
    return
  unknown = hooks.names() - tap.seen
  if unknown:
    from horse_jax.models.names import check_module_names
    check_module_names(model.config, sorted(unknown), first_layer=start)


def forward(model: Model, input_ids, attention_mask=None, *, position_ids=None,
            hooks: Hooks | None = None) -> ForwardOutput:
  """Full forward pass with optional named-module hooks.

  Args:
    model: the model.
    input_ids: token ids [B, T] (int).
    attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right); default all ones.
    position_ids: [B, T]; default counts real tokens from 0, so left padding needs nothing else.
    hooks: capture / offset / adapter hooks at named linear modules.

  Returns:
    ForwardOutput(logits [B, T, V], captured inputs by module name).
  """
  mask_BxT, positions_BxT = _mask_and_positions(jnp.shape(input_ids), attention_mask, position_ids)
  tap = Tap(hooks)
  h_BxTxD = embed(model, input_ids, positions_BxT)
  h_BxTxD = run_layers(model, h_BxTxD, mask_BxT, positions_BxT, tap)
  logits = arch(model.config).head(model.params, model.config, h_BxTxD, tap)
  _check_names(model, tap, hooks, 0)
  return ForwardOutput(logits, tap.captured)


def apply(model: Model, input_ids, attention_mask=None, *, position_ids=None,
          hooks: Hooks | None = None) -> jax.Array:
  """Logits [B, T, V] of `forward` (same arguments)."""
  return forward(model, input_ids, attention_mask, position_ids=position_ids, hooks=hooks).logits


def hidden_before(model: Model, layer: int, input_ids, attention_mask=None, *,
                  position_ids=None) -> jax.Array:
  """Residual stream entering decoder layer `layer` [B, T, D] (no hooks: it is edit-invariant).

  Args:
    model: the model.
    layer: decoder layer index (`num_layers` gives the stream before the final norm).
    input_ids, attention_mask, position_ids: as in `forward`.
  """
  mask_BxT, positions_BxT = _mask_and_positions(jnp.shape(input_ids), attention_mask, position_ids)
  h_BxTxD = embed(model, input_ids, positions_BxT)
  return run_layers(model, h_BxTxD, mask_BxT, positions_BxT, Tap(None), 0, layer)


def forward_from(model: Model, layer: int, hidden_states, attention_mask=None, *,
                 position_ids=None, hooks: Hooks | None = None) -> ForwardOutput:
  """Finishes a forward pass from the residual stream entering `layer` (see `hidden_before`).

  Args:
    model: the model.
    layer: the decoder layer `hidden_states` enters.
    hidden_states: [B, T, D] from `hidden_before(model, layer, ...)`.
    attention_mask, position_ids, hooks: as in `forward` (the same mask and positions as were
      given to `hidden_before`).

  Returns:
    ForwardOutput(logits [B, T, V], captured inputs by module name).
  """
  mask_BxT, positions_BxT = _mask_and_positions(hidden_states.shape[:2], attention_mask,
                                                position_ids)
  tap = Tap(hooks)
  h_BxTxD = run_layers(model, hidden_states, mask_BxT, positions_BxT, tap, layer)
  logits = arch(model.config).head(model.params, model.config, h_BxTxD, tap)
  _check_names(model, tap, hooks, layer)
  return ForwardOutput(logits, tap.captured)
