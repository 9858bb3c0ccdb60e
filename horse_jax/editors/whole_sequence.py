"""Shared pieces of the editors that wrap one linear module and decide from the whole sequence
(DEFER's gate, WISE's router; `horse_jax.editors.defer`, `horse_jax.editors.wise`).

Both reference implementations decide once per forward pass from the *whole* input sequence, and
their reference evaluation scores teacher-forced on "prompt target" with the last target token
included (EasyEdit's `test_prediction_acc`). This project's scoring batches hold prompt ++
target[:-1] (labels aligned with the logits), so the scored sequence here is the batch's input with
its last label token appended after the last real token (`full_sequence`): the logits of the first T
positions are unchanged by causality except through the decision, which then sees the sequence the
reference scores. Generation recomputes the whole sequence at every step (`greedy_whole`), as the
reference's `generate(use_cache=False)` does, so each new token is decided on the sequence so far.

Also here: the wrapped layer's input/output for a batch (`layer_io`) and the run from there to the
logits, with the edited module output either added to the residual stream (when the module is its
layer's last residual writer) or applied by a hook while the layer reruns.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from horse_jax.data.tokenize import IGNORE
from horse_jax.editors.codebook.edit import writes_residual
from horse_jax.models import Hooks, Model, apply, hidden_before, layer_index
from horse_jax.models.hooks import Tap
from horse_jax.models.transformer import arch, default_positions, run_layers


def full_sequence(input_ids_BxT, attention_mask_BxT, labels_BxT):
  """The scored sequence of right-padded rows: input ++ the last label token.

  Args:
    input_ids_BxT, attention_mask_BxT, labels_BxT: a right-padded EditBatch's arrays.

  Returns:
    (ids [B, T+1], mask [B, T+1], labels [B, T+1], last [B]): the last label token written at the
    first padded slot of each row that has labels; `last` = the index of the row's last real token
    (the appended one, else the input's last).
  """
  ids = jnp.asarray(input_ids_BxT, jnp.int32)
  mask = jnp.asarray(attention_mask_BxT, jnp.int32)
  labels = jnp.asarray(labels_BxT, jnp.int32)
  b, t = ids.shape
  length = jnp.sum(mask != 0, axis=1).astype(jnp.int32)
  valid = labels != IGNORE
  has = jnp.any(valid, axis=1)
  last_label = jnp.max(jnp.where(valid, jnp.arange(t)[None, :], -1), axis=1)
  token = jnp.take_along_axis(labels, jnp.maximum(last_label, 0)[:, None], axis=1)[:, 0]
  rows = jnp.arange(b)
  ids = jnp.concatenate([ids, jnp.zeros((b, 1), jnp.int32)], axis=1)
  mask = jnp.concatenate([mask, jnp.zeros((b, 1), jnp.int32)], axis=1)
  ids = ids.at[rows, length].set(jnp.where(has, token, ids[rows, length]))
  mask = mask.at[rows, length].set(jnp.where(has, 1, mask[rows, length]))
  labels = jnp.concatenate([labels, jnp.full((b, 1), IGNORE, jnp.int32)], axis=1)
  last = jnp.where(has, length, length - 1)
  return ids, mask, labels, last


class LayerIO(NamedTuple):
  """One batch at the wrapped module (all unedited: layers below it never change).

  Attributes:
    h0: residual stream entering the module's layer [B, T, D].
    x: the module's input [B, T, d_in].
    y: the module's output [B, T, d_out].
    h_next: residual stream leaving the layer [B, T, D].
    positions: position ids [B, T].
  """

  h0: jax.Array
  x: jax.Array
  y: jax.Array
  h_next: jax.Array
  positions: jax.Array


def layer_io(model: Model, name: str, ids_BxT, mask_BxT) -> LayerIO:
  """The wrapped module's input and output for a batch (see `LayerIO`)."""
  layer = layer_index(name)
  positions = default_positions(mask_BxT)
  h0 = hidden_before(model, layer, ids_BxT, mask_BxT)
  seen = {}

  def grab(x_in, y_out):
    seen["x"], seen["y"] = x_in, y_out
    return y_out

  h_next = run_layers(model, h0, mask_BxT, positions, Tap(Hooks(adapters={name: grab})), layer,
                      layer + 1)
  return LayerIO(h0, seen["x"], seen["y"], h_next, positions)


def logits_with_output(model: Model, name: str, io: LayerIO, mask_BxT,
                       new_output: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Logits [B, T, V] with the module's output replaced by `new_output(x, y)` (float32 or the
  model's dtype), from the unedited stream entering its layer.

  A residual writer's change is added to the stream leaving the layer (only the layers above run);
  any other module reruns its layer with a hook.
  """
  cfg = model.config
  layer = layer_index(name)
  if writes_residual(model, name):
    delta = new_output(io.x, io.y).astype(jnp.float32) - io.y.astype(jnp.float32)
    h = io.h_next + delta.astype(io.h_next.dtype)
    h = run_layers(model, h, mask_BxT, io.positions, Tap(None), layer + 1)
  else:
    hook = lambda x_in, y_out: new_output(x_in, y_out).astype(y_out.dtype)
    h = run_layers(model, io.h0, mask_BxT, io.positions, Tap(Hooks(adapters={name: hook})), layer)
  return arch(cfg).head(model.params, cfg, h, Tap(None))


def scored_logits(model: Model, name: str, batch_arrays, adapter_for) -> jax.Array:
  """Logits [B, T, V] of an EditBatch's rows, decided on their full sequence (`full_sequence`).

  Args:
    model: the base model.
    name: the wrapped module.
    batch_arrays: (input_ids, attention_mask, labels), right-padded.
    adapter_for: (mask [B, T+1], last [B]) -> fn(x_in, y_out) -> y_out, the module's hook.
  """
  ids, mask, labels = batch_arrays
  t = jnp.shape(ids)[1]
  ids_f, mask_f, _, last = full_sequence(ids, mask, labels)
  logits = apply(model, ids_f, mask_f, hooks=Hooks(adapters={name: adapter_for(mask_f, last)}))
  return logits[:, :t]


def greedy_whole(model: Model, name: str, input_ids_BxT, attention_mask_BxT, max_new_tokens: int,
                 adapter_for) -> jax.Array:
  """Greedy tokens [B, N] of left-padded prompts, each step a full forward pass over the sequence
  so far (no cache: the module's decision is redone on the whole sequence, as the reference's
  `generate(use_cache=False)`).

  Args:
    adapter_for: (mask [B, S], last [B]) -> the module's hook for sequences whose last real token
      is at `last`.
  """
  ids = jnp.asarray(input_ids_BxT, jnp.int32)
  mask = jnp.asarray(attention_mask_BxT, jnp.int32)
  b, t = ids.shape
  n = int(max_new_tokens)
  buf = jnp.concatenate([ids, jnp.zeros((b, n), jnp.int32)], axis=1)
  mbuf = jnp.concatenate([mask, jnp.zeros((b, n), jnp.int32)], axis=1)

  def body(i, carry):
    buf, mbuf, out = carry
    last = jnp.full((b,), t - 1, jnp.int32) + i
    logits = apply(model, buf, mbuf, hooks=Hooks(adapters={name: adapter_for(mbuf, last)}))
    token = jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1)
    token = token.astype(jnp.int32)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], t + i, axis=1)
    mbuf = jax.lax.dynamic_update_slice_in_dim(mbuf, jnp.ones((b, 1), jnp.int32), t + i, axis=1)
    return buf, mbuf, out.at[:, i].set(token)

  _, _, out = jax.lax.fori_loop(0, n, body, (buf, mbuf, jnp.zeros((b, n), jnp.int32)))
  return out
