"""Greedy generation with a preallocated KV cache.

The prompt is left-padded to [B, T]; the cache has T + max_new_tokens slots. Slot i of every row
holds the key/value of column i of the (padded) sequence, so one attention rule serves the prefill
and every decode step: a query in slot q sees slots k <= q that hold a real token (padding slots
and not-yet-written slots are masked). Positions count real tokens only, as in transformers.

The prefill runs once over the prompt (with the caller's hooks: captures are discarded, offsets and
adapters change the prompt's hidden states and hence the continuation); decoding is a `lax.scan`
of single-token steps, without hooks. Everything is one jitted program per (shapes, hooks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from horse_jax.models import layers
from horse_jax.models.hooks import Hooks, Tap
from horse_jax.models.transformer import Model, arch, default_positions


def init_cache(model: Model, batch: int, slots: int) -> list[tuple[jax.Array, jax.Array]]:
  """Zeroed (k, v) [B, S, G, Dh] per layer, in the model's dtype."""
  cfg = model.config
  shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
          for _ in range(cfg.num_layers)]


def step(model: Model, ids_BxT, positions_BxT, start, kv_valid_BxS, cache, tap: Tap):
  """Runs tokens that occupy slots [start, start + T) through all layers, updating the cache.

  Args:
    model: the model.
    ids_BxT: token ids of these slots.
    positions_BxT: their position ids.
    start: first slot (int or traced scalar).
    kv_valid_BxS: 1 where a slot holds a real token (these slots included).
    cache: per-layer (k, v) [B, S, G, Dh].
    tap: hooks for this call.

  Returns:
    (logits of the last slot [B, V], new cache).
  """
  cfg, mod = model.config, arch(model.config)
  b, t = ids_BxT.shape
  slots = kv_valid_BxS.shape[1]
  h = mod.embed(model.params, cfg, ids_BxT, positions_BxT, model.dtype)
  q_slots_BxT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  bias = layers.attention_bias(q_slots_BxT, jnp.arange(slots), kv_valid_BxS, cfg.sliding_window)
  new_cache = []
  for i in range(cfg.num_layers):
    k, v = cache[i]
    h, (k, v) = mod.block(mod.layer_params(model.params, i), cfg, h, positions_BxT, bias, tap, i,
                          cache=(k, v, start))
    new_cache.append((k, v))
  logits = mod.head(model.params, cfg, h[:, -1:], tap)
  return logits[:, -1].astype(jnp.float32), new_cache


def _generate(model: Model, input_ids_BxT, attention_mask_BxT, offsets, *, max_new_tokens: int,
              capture, adapters, eos_token_id, pad_token_id):
  b, t = input_ids_BxT.shape
  mask = attention_mask_BxT.astype(jnp.int32)
  kv_valid = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  cache = init_cache(model, b, t + max_new_tokens)
  tap = Tap(Hooks(capture=capture, offsets=offsets, adapters=dict(adapters)))
  logits, cache = step(model, input_ids_BxT, default_positions(mask), 0, kv_valid, cache, tap)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id
  next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)

  def body(carry, i):
    cache, token, kv_valid, done = carry
    slot = t + i
    kv_valid = jax.lax.dynamic_update_slice_in_dim(kv_valid, jnp.ones((b, 1), jnp.int32), slot, axis=1)
    logits, cache = step(model, token[:, None], (next_pos + i)[:, None], slot, kv_valid, cache,
                         Tap(None))
    new = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if eos_token_id is not None:
      new = jnp.where(done, pad_token_id, new)
      done = done | (new == eos_token_id)
    return (cache, new, kv_valid, done), new

  _, rest = jax.lax.scan(body, (cache, first, kv_valid, done), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


_generate_jit = jax.jit(_generate, static_argnames=("max_new_tokens", "capture", "adapters",
                                                    "eos_token_id", "pad_token_id"))


def generate(model: Model, input_ids, attention_mask=None, max_new_tokens: int = 16,
             hooks: Hooks | None = None, *, eos_token_id: int | None = None,
             pad_token_id: int | None = None) -> jax.Array:
  """Greedy decoding of left-padded prompts.

  Args:
    model: the model.
    input_ids: prompts, left-padded [B, T].
    attention_mask: [B, T], 1 on real tokens, 0 on the left padding; default all ones.
    max_new_tokens: number of tokens to generate (static: one compiled program per value).
    hooks: named-module hooks applied while the prompt is prefilled (not while decoding). Offsets
      must be [B, T, d_out]. Adapters are part of the compiled program: pass the same function
      object to reuse it.
    eos_token_id: if set, a row that produced it continues with `pad_token_id` (default eos).
    pad_token_id: filler after eos.

  Returns:
    New tokens [B, max_new_tokens] (int32).
  """
  if max_new_tokens < 1:
    raise ValueError("max_new_tokens must be >= 1")
  input_ids_BxT = jnp.asarray(input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids_BxT.shape, jnp.int32)
  hooks = hooks or Hooks()
  if pad_token_id is None:
    pad_token_id = eos_token_id
  return _generate_jit(model, input_ids_BxT, jnp.asarray(attention_mask), dict(hooks.offsets),
                       max_new_tokens=max_new_tokens, capture=tuple(hooks.capture),
                       adapters=tuple(sorted(hooks.adapters.items())), eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def greedy_reference(model: Model, input_ids, attention_mask, max_new_tokens: int):
  """Greedy decoding by repeated full forward passes (no cache): slow, for tests."""
  from horse_jax.models.transformer import apply
  ids, mask = input_ids, attention_mask
  out = []
  for _ in range(max_new_tokens):
    token = jnp.argmax(apply(model, ids, mask)[:, -1], axis=-1).astype(ids.dtype)
    out.append(token)
    ids = jnp.concatenate([ids, token[:, None]], axis=1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
  return jnp.stack(out, axis=1)
