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
from jax.sharding import PartitionSpec as P

from horse_jax.errors import UserError
from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, layers, registry
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


# --- config.json ---------------------------------------------------------------------------------


def parse_config(hf: dict, source: str) -> ModelConfig:
  """GPT-2 fields of a config.json (options the forward pass lacks are rejected)."""
  config_lib.check_activation(hf.get("activation_function"), source)
  if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
    raise UserError(f"{source}: GPT-2 options scale_attn_by_inverse_layer_idx / "
                    "reorder_and_upcast_attn are not supported")
  if hf.get("scale_attn_weights", True) is False:
    raise UserError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
  hidden = int(config_lib.require(hf, "n_embd", source))
  heads = int(config_lib.require(hf, "n_head", source))
  return ModelConfig(
      **config_lib.common_fields(hf, source),
      hidden_size=hidden,
      intermediate_size=int(hf.get("n_inner") or 4 * hidden),
      num_layers=int(config_lib.require(hf, "n_layer", source)),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=hidden // heads,
      max_position_embeddings=int(hf.get("n_positions", 1024)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      hidden_act=hf.get("activation_function", "gelu_new"),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      attention_bias=True,
      mlp_bias=True,
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  return dict(n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
              layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.hidden_act)


# --- HF name table (Conv1D weights are stored [in, out] already) ---------------------------------

CONV1D, COPY, always = hf_map.CONV1D, hf_map.COPY, hf_map.always

GLOBAL_RULES: tuple[hf_map.Rule, ...] = (
    ("transformer.wte.weight", "transformer.wte.embedding", COPY, hf_map.vd, always),
    ("transformer.wpe.weight", "transformer.wpe.embedding", COPY,
     lambda c: (c.max_position_embeddings, c.hidden_size), always),
    ("transformer.ln_f.weight", "transformer.ln_f.scale", COPY, hf_map.d, always),
    ("transformer.ln_f.bias", "transformer.ln_f.bias", COPY, hf_map.d, always),
    ("lm_head.weight", "lm_head.kernel", hf_map.LINEAR, hf_map.dv, hf_map.untied),
)
LAYER_RULES: tuple[hf_map.Rule, ...] = (
    ("ln_1.weight", "ln_1.scale", COPY, hf_map.d, always),
    ("ln_1.bias", "ln_1.bias", COPY, hf_map.d, always),
    ("attn.c_attn.weight", "attn.c_attn.kernel", CONV1D,
     lambda c: (c.hidden_size, 3 * c.hidden_size), always),
    ("attn.c_attn.bias", "attn.c_attn.bias", COPY, lambda c: (3 * c.hidden_size,), always),
    ("attn.c_proj.weight", "attn.c_proj.kernel", CONV1D, lambda c: hf_map.d(c) + hf_map.d(c), always),
    ("attn.c_proj.bias", "attn.c_proj.bias", COPY, hf_map.d, always),
    ("ln_2.weight", "ln_2.scale", COPY, hf_map.d, always),
    ("ln_2.bias", "ln_2.bias", COPY, hf_map.d, always),
    ("mlp.c_fc.weight", "mlp.c_fc.kernel", CONV1D, lambda c: hf_map.d(c) + hf_map.f(c), always),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", COPY, hf_map.f, always),
    ("mlp.c_proj.weight", "mlp.c_proj.kernel", CONV1D, lambda c: hf_map.f(c) + hf_map.d(c), always),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", COPY, hf_map.d, always),
)

LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# --- sharding: c_attn / c_fc by output column, the two c_proj by input row -----------------------

MODEL = "model"
SHARDING_RULES = (
    (r"\.(c_attn|c_fc)\.kernel$", P(None, MODEL)),
    (r"\.(c_attn|c_fc)\.bias$", P(MODEL)),
    (r"\.(attn|mlp)\.c_proj\.kernel$", P(MODEL, None)),
    (r"wte\.embedding$", P(MODEL, None)),
    (r"^lm_head\.kernel$", P(None, MODEL)),
)

ARCH = registry.register(registry.Architecture(
    name="gpt2",
    model_types=("gpt2",),
    hf_classes={"gpt2": "GPT2LMHeadModel"},
    parse_config=parse_config,
    config_to_hf=config_to_hf,
    embed=embed,
    block=block,
    head=head,
    layer_params=layer_params,
    layer_prefix=LAYER_PREFIX,
    global_rules=GLOBAL_RULES,
    layer_rules=LAYER_RULES,
    linear_modules=LINEAR_MODULES,
    edit_module="mlp.c_proj",
    codebook_module="mlp.c_proj",
    residual_writers=("mlp.c_proj",),
    sharding_rules=SHARDING_RULES,
))
