"""GPT-J: parallel attention + MLP from one LayerNorm, partial interleaved rotary, lm_head bias.

Param tree (HF names, kernels [in, out]):
  transformer.wte.embedding [V, D]
  transformer.h.{i}.ln_1.{scale, bias}
  transformer.h.{i}.attn.{q,k,v,out}_proj.kernel (no biases)
  transformer.h.{i}.mlp.fc_in.{kernel [D, F], bias}, mlp.fc_out.{kernel [F, D], bias}
  transformer.ln_f.{scale, bias}, lm_head.{kernel [D, V], bias [V]}

Rotary: the first `rotary_dim` channels of each head rotate in adjacent pairs (0,1), (2,3), ...;
the rest pass through (GPT-J-6B: rotary_dim 64 of head_dim 256).
"""

from __future__ import annotations

from horse_jax.models import layers
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

LAYER_PREFIX = "transformer.h"


def embed(params, cfg: ModelConfig, input_ids_BxT, positions_BxT, dtype):
  del cfg, positions_BxT
  return params["transformer"]["wte"]["embedding"].astype(dtype)[input_ids_BxT]


def attention(p, cfg: ModelConfig, x_BxTxD, positions_BxT, bias, tap: Tap, name: str, cache):
  b, t, d = x_BxTxD.shape
  heads = (b, t, cfg.num_heads, cfg.head_dim)
  q = tap.linear(f"{name}.q_proj", p["q_proj"], x_BxTxD).reshape(heads)
  k = tap.linear(f"{name}.k_proj", p["k_proj"], x_BxTxD).reshape(heads)
  v = tap.linear(f"{name}.v_proj", p["v_proj"], x_BxTxD).reshape(heads)
  rotary_dim = cfg.rotary_dim or cfg.head_dim
  cos, sin = layers.rope_angles(cfg, positions_BxT, rotary_dim)
  q = layers.apply_rope_interleaved(q, cos, sin, rotary_dim)
  k = layers.apply_rope_interleaved(k, cos, sin, rotary_dim)
  k, v, new_cache = layers.update_cache(cache, k, v)
  out = layers.dot_attention(q, k, v, bias).reshape(b, t, d)
  return tap.linear(f"{name}.out_proj", p["out_proj"], out), new_cache


def mlp(p, cfg: ModelConfig, x_BxTxD, tap: Tap, name: str):
  hidden = layers.activation(cfg.hidden_act, tap.linear(f"{name}.fc_in", p["fc_in"], x_BxTxD))
  return tap.linear(f"{name}.fc_out", p["fc_out"], hidden)


def block(p, cfg: ModelConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer: h + attn(ln(h)) + mlp(ln(h)). Returns (h, new_cache)."""
  name = f"{LAYER_PREFIX}.{index}"
  x = layers.layer_norm(p["ln_1"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["attn"], cfg, x, positions_BxT, bias, tap, f"{name}.attn", cache)
  return h_BxTxD + attn + mlp(p["mlp"], cfg, x, tap, f"{name}.mlp"), new_cache


def head(params, cfg: ModelConfig, h_BxTxD, tap: Tap):
  h_BxTxD = layers.layer_norm(params["transformer"]["ln_f"], h_BxTxD, cfg.norm_eps)
  if cfg.tie_word_embeddings:
    import jax.numpy as jnp
    emb = params["transformer"]["wte"]["embedding"]
    return jnp.einsum("btd,vd->btv", h_BxTxD, emb.astype(h_BxTxD.dtype))
  return tap.linear("lm_head", params["lm_head"], h_BxTxD)


def layer_params(params, index: int):
  return params["transformer"]["h"][str(index)]
