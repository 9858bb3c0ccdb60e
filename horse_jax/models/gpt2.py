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

from horse_jax.errors import UserError
from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, layers, registry, sharding
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

EMBEDDING = "transformer.wte.embedding"  # token embedding [V, D], also the tied head
LAYER_PREFIX = "transformer.h"
embed = layers.token_embedding(EMBEDDING, "transformer.wpe.embedding")


def attention(p, cfg: ModelConfig, x_BxTxD, bias, tap: Tap, name: str, cache):
  b, t, d = x_BxTxD.shape
  qkv = tap.linear(f"{name}.c_attn", p["c_attn"], x_BxTxD)
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, cfg.num_heads, cfg.head_dim)
             for i in range(3))
  k, v, new_cache = layers.update_cache(cache, k, v)
  out = layers.dot_attention(q, k, v, bias).reshape(b, t, d)
  return tap.linear(f"{name}.c_proj", p["c_proj"], out), new_cache


def block(p, cfg: ModelConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer (pre-LN). Returns (h, new_cache)."""
  del positions_BxT  # absolute positions were added at the embedding
  name = f"{LAYER_PREFIX}.{index}"
  x = layers.layer_norm(p["ln_1"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["attn"], cfg, x, bias, tap, f"{name}.attn", cache)
  h_BxTxD = h_BxTxD + attn
  x = layers.layer_norm(p["ln_2"], h_BxTxD, cfg.norm_eps)
  mlp = layers.feed_forward(p["mlp"], cfg, x, tap, f"{name}.mlp", "c_fc", "c_proj")
  return h_BxTxD + mlp, new_cache


head = layers.norm_and_unembed("transformer.ln_f", layers.layer_norm, EMBEDDING)


# --- config.json ---------------------------------------------------------------------------------


def parse_config(hf: dict, source: str) -> ModelConfig:
  """GPT-2 fields of a config.json (options the forward pass lacks are rejected)."""
  if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
    raise UserError(f"{source}: GPT-2 options scale_attn_by_inverse_layer_idx / "
                    "reorder_and_upcast_attn are not supported")
  if hf.get("scale_attn_weights", True) is False:
    raise UserError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
  fields = config_lib.gpt2_fields(hf, source, max_positions=1024, tie_word_embeddings=True)
  return ModelConfig(**fields, attention_bias=True, mlp_bias=True)


config_to_hf = config_lib.gpt2_to_hf


# --- HF name table (Conv1D weights are stored [in, out] already) ---------------------------------


def _d3(c):  # fused q, k, v
  return (3 * c.hidden_size,)


def _n_positions(c):
  return (c.max_position_embeddings,)


GLOBAL_RULES: tuple[hf_map.Rule, ...] = (
    hf_map.embedding("transformer.wte"),
    hf_map.embedding("transformer.wpe", _n_positions),
    *hf_map.norm("transformer.ln_f", bias=True),
    *hf_map.linear("lm_head", hf_map.d, hf_map.v, present=hf_map.untied),
)
LAYER_RULES: tuple[hf_map.Rule, ...] = (
    *hf_map.norm("ln_1", bias=True),
    *hf_map.linear("attn.c_attn", hf_map.d, _d3, hf_map.always, kind=hf_map.CONV1D),
    *hf_map.linear("attn.c_proj", hf_map.d, hf_map.d, hf_map.always, kind=hf_map.CONV1D),
    *hf_map.norm("ln_2", bias=True),
    *hf_map.linear("mlp.c_fc", hf_map.d, hf_map.f, hf_map.always, kind=hf_map.CONV1D),
    *hf_map.linear("mlp.c_proj", hf_map.f, hf_map.d, hf_map.always, kind=hf_map.CONV1D),
)

LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# --- sharding: c_attn / c_fc by output column, the two c_proj by input row -----------------------

SHARDING_RULES = sharding.megatron_rules(EMBEDDING, column=("attn.c_attn", "mlp.c_fc"),
                                         row=("attn.c_proj", "mlp.c_proj"))

ARCH = registry.register(registry.Architecture(
    name="gpt2", model_types=("gpt2",), hf_classes={"gpt2": "GPT2LMHeadModel"},
    edit_module="mlp.c_proj", codebook_module="mlp.c_proj", residual_writers=("mlp.c_proj",),
    linear_modules=LINEAR_MODULES,
    parse_config=parse_config, config_to_hf=config_to_hf, embed=embed, block=block, head=head,
    layer_prefix=LAYER_PREFIX, global_rules=GLOBAL_RULES, layer_rules=LAYER_RULES,
    sharding_rules=SHARDING_RULES))
