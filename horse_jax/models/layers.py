"""Building blocks shared by the architectures: norms, activations, rotary embeddings, attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.models.config import ModelConfig

NEG_INF = -1e30  # large finite negative: rows that see nothing stay NaN-free


def rms_norm(params, x_BxTxD: jax.Array, eps: float) -> jax.Array:
  """Llama RMSNorm: statistics in float32, weight applied in the input dtype (as transformers)."""
  x32 = x_BxTxD.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = jnp.expand_dims(params["scale"].astype(x_BxTxD.dtype), range(x_BxTxD.ndim - 1))
  return scale * x32.astype(x_BxTxD.dtype)


def layer_norm(params, x_BxTxD: jax.Array, eps: float) -> jax.Array:
  """LayerNorm with float32 statistics."""
  x32 = x_BxTxD.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  lead = range(x_BxTxD.ndim - 1)
  y = (y * jnp.expand_dims(params["scale"].astype(jnp.float32), lead) +
       jnp.expand_dims(params["bias"].astype(jnp.float32), lead))
  return y.astype(x_BxTxD.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "silu":
    return jax.nn.silu(x)
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unsupported activation {name!r}")


def feed_forward(p, cfg: ModelConfig, x_BxTxD: jax.Array, tap, name: str, up: str,
                 down: str) -> jax.Array:
  """The two-layer MLP down(act(up(x))) (GPT-2 c_fc / c_proj, GPT-J fc_in / fc_out).

  Args:
    p: the MLP's params ({up: {...}, down: {...}}).
    cfg: the config (`hidden_act`).
    x_BxTxD: the MLP's input.
    tap: the forward pass's `Tap` (both linears are hookable modules).
    name: the MLP's module name, e.g. "transformer.h.3.mlp".
    up, down: the two linear modules' names inside it.
  """
  hidden = activation(cfg.hidden_act, tap.linear(f"{name}.{up}", p[up], x_BxTxD))
  return tap.linear(f"{name}.{down}", p[down], hidden)


def rope_inv_freq(cfg: ModelConfig, rotary_dim: int) -> np.ndarray:
  """Inverse frequencies [rotary_dim // 2] (float64 then float32), with linear/llama3 scaling."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
  scaling = cfg.rope_scaling_dict
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling["rope_type"] == "linear":
    return (inv_freq / float(scaling["factor"])).astype(np.float32)
  if scaling["rope_type"] == "yarn":
    return _yarn_inv_freq(cfg, scaling, inv_freq, rotary_dim)
  # llama3: long wavelengths are slowed by `factor`, short ones kept, smooth blend in between.
  factor = float(scaling["factor"])
  low = float(scaling.get("low_freq_factor", 1.0))
  high = float(scaling.get("high_freq_factor", 4.0))
  old_len = float(scaling["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_factor(cfg: ModelConfig, scaling: dict) -> float:
  factor = scaling.get("factor")
  if factor is None:  # as transformers: the context extension ratio
    return cfg.max_position_embeddings / float(scaling["original_max_position_embeddings"])
  return float(factor)


def _yarn_inv_freq(cfg: ModelConfig, scaling: dict, inv_freq: np.ndarray,
                   rotary_dim: int) -> np.ndarray:
  """YaRN: high frequencies kept (extrapolated), low ones divided by `factor` (interpolated), with
  a linear ramp over the dimensions between the `beta_fast` and `beta_slow` rotation counts."""
  factor = _yarn_factor(cfg, scaling)
  beta_fast = float(scaling.get("beta_fast") or 32.0)
  beta_slow = float(scaling.get("beta_slow") or 1.0)
  old_len = float(scaling["original_max_position_embeddings"])
  base = cfg.rope_theta

  def dim_for(rotations):  # the dimension that turns `rotations` times over the old context
    return rotary_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim_for(beta_fast), dim_for(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  keep = 1.0 - ramp  # 1 = extrapolate (unchanged frequency), 0 = interpolate (divided by factor)
  return (inv_freq / factor * (1.0 - keep) + inv_freq * keep).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
  """The factor YaRN multiplies cos and sin by (1.0 for every other rope type)."""
  scaling = cfg.rope_scaling_dict
  if scaling is None or scaling["rope_type"] != "yarn":
    return 1.0
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  factor = _yarn_factor(cfg, scaling)

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if m and m_all:
    return float(mscale(factor, float(m)) / mscale(factor, float(m_all)))
  return mscale(factor)


def rope_angles(cfg: ModelConfig, positions_BxT: jax.Array, rotary_dim: int):
  """cos, sin [B, T, rotary_dim // 2] in float32 (times YaRN's attention factor when it applies)."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg, rotary_dim))
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  scale = rope_attention_factor(cfg)
  if scale != 1.0:
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope_half(x_BxTxHxD: jax.Array, cos, sin) -> jax.Array:
  """Llama layout: the two halves of the head are the (real, imaginary) parts."""
  half = x_BxTxHxD.shape[-1] // 2
  x1, x2 = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
  out = jnp.concatenate([x1f * cos - x2f * sin, x2f * cos + x1f * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def apply_rope_interleaved(x_BxTxHxD: jax.Array, cos, sin, rotary_dim: int) -> jax.Array:
  """GPT-J layout: pairs (0,1), (2,3), ... of the first `rotary_dim` channels rotate."""
  rot, rest = x_BxTxHxD[..., :rotary_dim], x_BxTxHxD[..., rotary_dim:]
  rot = rot.astype(jnp.float32)
  even, odd = rot[..., 0::2], rot[..., 1::2]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  out = out.reshape(rot.shape).astype(x_BxTxHxD.dtype)
  return jnp.concatenate([out, rest], axis=-1)


def attention_bias(q_slots_BxT: jax.Array, kv_slots_S: jax.Array, kv_valid_BxS: jax.Array,
                   sliding_window: int | None) -> jax.Array:
  """Additive attention bias [B, 1, T, S]: causal by slot index, padding and sliding window masked.

  Slots are absolute indices in the (padded) sequence, so left padding and a KV cache share one rule.
  """
  q = q_slots_BxT[:, :, None]
  k = kv_slots_S[None, None, :]
  allowed = (k <= q) & kv_valid_BxS[:, None, :].astype(bool)
  if sliding_window is not None:
    allowed = allowed & (k > q - sliding_window)
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None, :, :]


def dot_attention(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, bias_Bx1xTxS) -> jax.Array:
  """Grouped-query softmax attention, float32 softmax. Returns [B, T, H, D]."""
  num_heads, num_groups = q_BxTxHxD.shape[2], k_BxSxGxD.shape[2]
  rep = num_heads // num_groups
  b, t, _, d = q_BxTxHxD.shape
  q = q_BxTxHxD.reshape(b, t, num_groups, rep, d)
  scores = jnp.einsum("btgrd,bsgd->bgrts", q, k_BxSxGxD).astype(jnp.float32) / math.sqrt(d)
  scores = scores + bias_Bx1xTxS[:, :, None, :, :]
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxD.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_BxSxGxD)
  return out.reshape(b, t, num_heads, d)


def _at(params, path: str):
  for key in path.split("."):
    params = params[key]
  return params


def token_embedding(table: str, positions: str | None = None):
  """An architecture's `embed`: rows of an embedding table, plus learned absolute positions.

  Args:
    table: param path of the token embedding [V, D], e.g. "model.embed_tokens.embedding".
    positions: param path of a learned position embedding [P, D] (GPT-2), or None.

  Returns:
    embed(params, cfg, input_ids [B, T], positions [B, T], dtype) -> h [B, T, D].
  """
  def embed(params, cfg: ModelConfig, input_ids_BxT, positions_BxT, dtype):
    del cfg
    h_BxTxD = _at(params, table).astype(dtype)[input_ids_BxT]
    if positions is None:
      return h_BxTxD
    return h_BxTxD + _at(params, positions).astype(dtype)[positions_BxT]
  return embed


def norm_and_unembed(final_norm: str, norm, table: str):
  """An architecture's `head`: the final norm, then the tied embedding or the `lm_head` module.

  Args:
    final_norm: param path of the final norm, e.g. "model.norm".
    norm: the architecture's norm, norm(params, x, eps) (e.g. `rms_norm`).
    table: param path of the token embedding [V, D], the head when `tie_word_embeddings`.

  Returns:
    head(params, cfg, h [B, T, D], tap) -> logits [B, T, V] (an untied lm_head goes through
    `tap.linear`, so hooks reach it).
  """
  def head(params, cfg: ModelConfig, h_BxTxD, tap):
    h_BxTxD = norm(_at(params, final_norm), h_BxTxD, cfg.norm_eps)
    if cfg.tie_word_embeddings:
      return jnp.einsum("btd,vd->btv", h_BxTxD, _at(params, table).astype(h_BxTxD.dtype))
    return tap.linear("lm_head", params["lm_head"], h_BxTxD)
  return head


def update_cache(cache, k_BxTxGxD: jax.Array, v_BxTxGxD: jax.Array):
  """Writes this call's keys/values into the cache at its write index.

  Args:
    cache: None (no cache: returns k, v unchanged) or (k [B,S,G,D], v [B,S,G,D], write_index).
    k_BxTxGxD, v_BxTxGxD: this call's keys and values.

  Returns:
    (keys to attend over, values to attend over, new cache (k, v) or None).
  """
  if cache is None:
    return k_BxTxGxD, v_BxTxGxD, None
  k_cache, v_cache, index = cache
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxTxGxD.astype(k_cache.dtype), index, axis=1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxTxGxD.astype(v_cache.dtype), index, axis=1)
  return k_cache, v_cache, (k_cache, v_cache)
