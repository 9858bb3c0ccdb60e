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

from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, layers, registry, sharding
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

EMBEDDING = "transformer.wte.embedding"  # token embedding [V, D], also the tied head
LAYER_PREFIX = "transformer.h"
embed = layers.token_embedding(EMBEDDING)


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


def block(p, cfg: ModelConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer: h + attn(ln(h)) + mlp(ln(h)). Returns (h, new_cache)."""
  name = f"{LAYER_PREFIX}.{index}"
  x = layers.layer_norm(p["ln_1"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["attn"], cfg, x, positions_BxT, bias, tap, f"{name}.attn", cache)
  mlp = layers.feed_forward(p["mlp"], cfg, x, tap, f"{name}.mlp", "fc_in", "fc_out")
  return h_BxTxD + attn + mlp, new_cache


head = layers.norm_and_unembed("transformer.ln_f", layers.layer_norm, EMBEDDING)


# --- config.json ---------------------------------------------------------------------------------


def parse_config(hf: dict, source: str) -> ModelConfig:
  """GPT-J fields of a config.json: GPT-2's names plus `rotary_dim`."""
  return ModelConfig(
      **config_lib.gpt2_fields(hf, source, max_positions=2048, tie_word_embeddings=False),
      rope_theta=10000.0,
      rotary_dim=int(hf["rotary_dim"]) if hf.get("rotary_dim") else None,
      attention_bias=False,
      mlp_bias=True,
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  return dict(config_lib.gpt2_to_hf(cfg), rotary_dim=cfg.rotary_dim)


# --- HF name table -------------------------------------------------------------------------------

GLOBAL_RULES: tuple[hf_map.Rule, ...] = (
    hf_map.embedding("transformer.wte"),
    *hf_map.norm("transformer.ln_f", bias=True),
    *hf_map.linear("lm_head", hf_map.d, hf_map.v, hf_map.always, present=hf_map.untied),
)
LAYER_RULES: tuple[hf_map.Rule, ...] = (
    *hf_map.norm("ln_1", bias=True),
    *hf_map.linear("attn.q_proj", hf_map.d, hf_map.d),
    *hf_map.linear("attn.k_proj", hf_map.d, hf_map.d),
    *hf_map.linear("attn.v_proj", hf_map.d, hf_map.d),
    *hf_map.linear("attn.out_proj", hf_map.d, hf_map.d),
    *hf_map.linear("mlp.fc_in", hf_map.d, hf_map.f, hf_map.always),
    *hf_map.linear("mlp.fc_out", hf_map.f, hf_map.d, hf_map.always),
)

LINEAR_MODULES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in",
                  "mlp.fc_out")

# --- sharding: q/k/v and fc_in by output column, out_proj and fc_out by input row ----------------

SHARDING_RULES = sharding.megatron_rules(
    EMBEDDING, column=("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"),
    row=("attn.out_proj", "mlp.fc_out"))

ARCH = registry.register(registry.Architecture(
    name="gptj", model_types=("gptj",), hf_classes={"gptj": "GPTJForCausalLM"},
    edit_module="mlp.fc_out", codebook_module="mlp.fc_out",
    # Attention and MLP read the same input, so both outputs are the layer's last additions.
    residual_writers=("mlp.fc_out", "attn.out_proj"),
    linear_modules=LINEAR_MODULES,
    parse_config=parse_config, config_to_hf=config_to_hf, embed=embed, block=block, head=head,
    layer_prefix=LAYER_PREFIX, global_rules=GLOBAL_RULES, layer_rules=LAYER_RULES,
    sharding_rules=SHARDING_RULES))
