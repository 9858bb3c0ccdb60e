"""Llama family: Llama-2/3/3.1, Mistral (sliding window), Qwen2/2.5 and DeepSeek-R1 distills.

Param tree (HF names, kernels [in, out]):
  model.embed_tokens.embedding [V, D]
  model.layers.{i}.input_layernorm.scale, post_attention_layernorm.scale
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{kernel, bias?}
  model.layers.{i}.mlp.{gate,up,down}_proj.{kernel, bias?}
  model.norm.scale, lm_head.kernel [D, V] (absent when tied)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horse_jax.models import layers
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

LAYER_PREFIX = "model.layers"


def embed(params, cfg: ModelConfig, input_ids_BxT, positions_BxT, dtype):
  del cfg, positions_BxT
  return params["model"]["embed_tokens"]["embedding"].astype(dtype)[input_ids_BxT]


def attention(p, cfg: ModelConfig, x_BxTxD, positions_BxT, bias, tap: Tap, name: str, cache):
  """Self-attention; `cache` is None or (k [B,S,G,Dh], v, write_index) for incremental decoding."""
  b, t, _ = x_BxTxD.shape
  q = tap.linear(f"{name}.q_proj", p["q_proj"], x_BxTxD).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = tap.linear(f"{name}.k_proj", p["k_proj"], x_BxTxD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = tap.linear(f"{name}.v_proj", p["v_proj"], x_BxTxD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  cos, sin = layers.rope_angles(cfg, positions_BxT, cfg.head_dim)
  q, k = layers.apply_rope_half(q, cos, sin), layers.apply_rope_half(k, cos, sin)
  new_cache = None
  if cache is not None:
    k_cache, v_cache, index = cache
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    k, v, new_cache = k_cache, v_cache, (k_cache, v_cache)
  out = layers.dot_attention(q, k, v, bias).reshape(b, t, cfg.num_heads * cfg.head_dim)
  return tap.linear(f"{name}.o_proj", p["o_proj"], out), new_cache


def mlp(p, cfg: ModelConfig, x_BxTxD, tap: Tap, name: str):
  gate = tap.linear(f"{name}.gate_proj", p["gate_proj"], x_BxTxD)
  up = tap.linear(f"{name}.up_proj", p["up_proj"], x_BxTxD)
  return tap.linear(f"{name}.down_proj", p["down_proj"], layers.activation(cfg.hidden_act, gate) * up)


def block(p, cfg: ModelConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer. Returns (h, new_cache)."""
  name = f"{LAYER_PREFIX}.{index}"
  x = layers.rms_norm(p["input_layernorm"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["self_attn"], cfg, x, positions_BxT, bias, tap, f"{name}.self_attn", cache)
  h_BxTxD = h_BxTxD + attn
  x = layers.rms_norm(p["post_attention_layernorm"], h_BxTxD, cfg.norm_eps)
  return h_BxTxD + mlp(p["mlp"], cfg, x, tap, f"{name}.mlp"), new_cache


def head(params, cfg: ModelConfig, h_BxTxD, tap: Tap):
  h_BxTxD = layers.rms_norm(params["model"]["norm"], h_BxTxD, cfg.norm_eps)
  if cfg.tie_word_embeddings:
    emb = params["model"]["embed_tokens"]["embedding"]
    return jnp.einsum("btd,vd->btv", h_BxTxD, emb.astype(h_BxTxD.dtype))
  return tap.linear("lm_head", params["lm_head"], h_BxTxD)


def layer_params(params, index: int):
  return params["model"]["layers"][str(index)]
