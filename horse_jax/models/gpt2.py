"""GPT-2: learned absolute positions, LayerNorm, fused q/k/v (`c_attn`), Conv1D layout.

Param tree (HF names, kernels [in, out], which is also the Conv1D storage layout):
  transformer.wte.embedding [V, D], transformer.wpe.embedding [P, D]
  transformer.h.{i}.ln_1 / ln_2 .{scale, bias}
  transformer.h.{i}.attn.c_attn.{kernel [D, 3D], bias}, attn.c_proj.{kernel [D, D], bias}
  transformer.h.{i}.mlp.c_fc.{kernel [D, F], bias}, mlp.c_proj.{kernel [F, D], bias}
  transformer.ln_f.{scale, bias}; lm_head tied to wte (an untied lm_head.kernel is also accepted)

Positions come from `position_ids` (real tokens counted from 0), so left padding gives each real
token the same learned position embedding as without padding.
"""

from __future__ import annotations

import jax.numpy as jnp

from horse_jax.models import layers
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

LAYER_PREFIX = "transformer.h"


def embed(params, cfg: ModelConfig, input_ids_BxT, positions_BxT, dtype):
  del cfg
  tr = params["transformer"]
  return (tr["wte"]["embedding"].astype(dtype)[input_ids_BxT] +
          tr["wpe"]["embedding"].astype(dtype)[positions_BxT])


def attention(p, cfg: ModelConfig, x_BxTxD, bias, tap: Tap, name: str, cache):
  b, t, d = x_BxTxD.shape
  qkv = tap.linear(f"{name}.c_attn", p["c_attn"], x_BxTxD)
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, cfg.num_heads, cfg.head_dim)
             for i in range(3))
  k, v, new_cache = layers.update_cache(cache, k, v)
  out = layers.dot_attention(q, k, v, bias).reshape(b, t, d)
  return tap.linear(f"{name}.c_proj", p["c_proj"], out), new_cache


def mlp(p, cfg: ModelConfig, x_BxTxD, tap: Tap, name: str):
  hidden = layers.activation(cfg.hidden_act, tap.linear(f"{name}.c_fc", p["c_fc"], x_BxTxD))
  return tap.linear(f"{name}.c_proj", p["c_proj"], hidden)


def block(p, cfg: ModelConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer (pre-LN). Returns (h, new_cache)."""
  del positions_BxT  # absolute positions were added at the embedding
  name = f"{LAYER_PREFIX}.{index}"
  x = layers.layer_norm(p["ln_1"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["attn"], cfg, x, bias, tap, f"{name}.attn", cache)
  h_BxTxD = h_BxTxD + attn
  x = layers.layer_norm(p["ln_2"], h_BxTxD, cfg.norm_eps)
  return h_BxTxD + mlp(p["mlp"], cfg, x, tap, f"{name}.mlp"), new_cache


def head(params, cfg: ModelConfig, h_BxTxD, tap: Tap):
  h_BxTxD = layers.layer_norm(params["transformer"]["ln_f"], h_BxTxD, cfg.norm_eps)
  if cfg.tie_word_embeddings:
    emb = params["transformer"]["wte"]["embedding"]
    return jnp.einsum("btd,vd->btv", h_BxTxD, emb.astype(h_BxTxD.dtype))
  return tap.linear("lm_head", params["lm_head"], h_BxTxD)


def layer_params(params, index: int):
  return params["transformer"]["h"][str(index)]
