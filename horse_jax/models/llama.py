"""Llama family: Llama-2/3/3.1, Mistral (sliding window), Qwen2/2.5 and DeepSeek-R1 distills.

Holds everything specific to the family (registered in `registry` at the bottom): config parsing,
the HF name table, addressable linear modules, sharding rules and the forward pass. Qwen3 reuses this
forward pass (`qwen3.py`): a layer with `q_norm` / `k_norm` params normalises q and k per head.

Param tree (HF names, kernels [in, out]):
  model.embed_tokens.embedding [V, D]
  model.layers.{i}.input_layernorm.scale, post_attention_layernorm.scale
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{kernel, bias?}
  model.layers.{i}.mlp.{gate,up,down}_proj.{kernel, bias?}
  model.norm.scale, lm_head.kernel [D, V] (absent when tied)
"""

from __future__ import annotations

from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, layers, registry, sharding
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

EMBEDDING = "model.embed_tokens.embedding"  # token embedding [V, D], also the tied head
LAYER_PREFIX = "model.layers"
embed = layers.token_embedding(EMBEDDING)


def attention(p, cfg: ModelConfig, x_BxTxD, positions_BxT, bias, tap: Tap, name: str, cache):
  """Self-attention; `cache` is None or (k [B,S,G,Dh], v, write_index) for incremental decoding."""
  b, t, _ = x_BxTxD.shape
  q = tap.linear(f"{name}.q_proj", p["q_proj"], x_BxTxD).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = tap.linear(f"{name}.k_proj", p["k_proj"], x_BxTxD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = tap.linear(f"{name}.v_proj", p["v_proj"], x_BxTxD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if "q_norm" in p:  # Qwen3: RMSNorm over each head's channels, before rope
    q = layers.rms_norm(p["q_norm"], q, cfg.norm_eps)
    k = layers.rms_norm(p["k_norm"], k, cfg.norm_eps)
  cos, sin = layers.rope_angles(cfg, positions_BxT, cfg.head_dim)
  q, k = layers.apply_rope_half(q, cos, sin), layers.apply_rope_half(k, cos, sin)
  k, v, new_cache = layers.update_cache(cache, k, v)
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


head = layers.norm_and_unembed("model.norm", layers.rms_norm, EMBEDDING)


# --- config.json ---------------------------------------------------------------------------------


def parse_config(hf: dict, source: str) -> ModelConfig:
  """Llama / Mistral / Qwen2 fields of a config.json."""
  model_type = hf["model_type"]
  config_lib.check_activation(hf.get("hidden_act"), source)
  fields = config_lib.decoder_fields(hf, source, head_dim=None, max_positions=2048, norm_eps=1e-6)
  theta, scaling = config_lib.rope_from_hf(hf)
  num_layers = fields["num_layers"]
  window = config_lib.sliding_window_from_hf(hf, num_layers, source, use_flag=model_type == "qwen2",
                                             max_window_layers=num_layers)
  return ModelConfig(
      **fields,
      rope_theta=theta,
      rope_scaling=scaling,
      # Qwen2 always has q/k/v biases and Mistral never has any, whatever the config says.
      attention_bias=(model_type == "qwen2" or
                      (model_type == "llama" and bool(hf.get("attention_bias", False)))),
      mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
      sliding_window=window,
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  hf = config_lib.decoder_to_hf(cfg)
  if cfg.model_type in ("llama", "qwen3"):
    hf.update(attention_bias=cfg.attention_bias)
  if cfg.model_type == "llama":
    hf.update(mlp_bias=cfg.mlp_bias)
  if cfg.model_type == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  if cfg.model_type in ("qwen2", "qwen3"):
    # max_window_layers 0: the window (if any) covers every layer, as parse_config requires.
    hf.update(use_sliding_window=cfg.sliding_window is not None,
              sliding_window=cfg.sliding_window, max_window_layers=0)
  return hf


# --- HF name table -------------------------------------------------------------------------------


def _qkv_bias(c):
  return c.attention_bias


def _o_bias(c):  # Qwen2 has biases on q/k/v only; Llama's (and Qwen3's) `attention_bias` covers o_proj.
  return c.attention_bias and c.model_type != "qwen2"


def _mlp_bias(c):
  return c.mlp_bias


GLOBAL_RULES: tuple[hf_map.Rule, ...] = (
    hf_map.embedding("model.embed_tokens"),
    *hf_map.norm("model.norm"),
    *hf_map.linear("lm_head", hf_map.d, hf_map.v, present=hf_map.untied),
)
LAYER_RULES: tuple[hf_map.Rule, ...] = (
    *hf_map.norm("input_layernorm"),
    *hf_map.norm("post_attention_layernorm"),
    *hf_map.linear("self_attn.q_proj", hf_map.d, hf_map.q, _qkv_bias),
    *hf_map.linear("self_attn.k_proj", hf_map.d, hf_map.kv, _qkv_bias),
    *hf_map.linear("self_attn.v_proj", hf_map.d, hf_map.kv, _qkv_bias),
    *hf_map.linear("self_attn.o_proj", hf_map.q, hf_map.d, _o_bias),
    *hf_map.linear("mlp.gate_proj", hf_map.d, hf_map.f, _mlp_bias),
    *hf_map.linear("mlp.up_proj", hf_map.d, hf_map.f, _mlp_bias),
    *hf_map.linear("mlp.down_proj", hf_map.f, hf_map.d, _mlp_bias),
)

LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# --- sharding: q/k/v and gate/up by output column, o/down by input row ----------------------------

SHARDING_RULES = sharding.megatron_rules(
    EMBEDDING, column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                       "mlp.up_proj"),
    row=("self_attn.o_proj", "mlp.down_proj"))


def _init_params(cfg, key, dtype, std):
  from horse_jax.models.init import init_llama_params  # init imports the forward pass
  return init_llama_params(cfg, key, dtype, std)


ARCH = registry.register(registry.Architecture(
    name="llama", model_types=("llama", "mistral", "qwen2"),
    hf_classes={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"},
    edit_module="mlp.down_proj", codebook_module="mlp.down_proj",
    residual_writers=("mlp.down_proj",),
    linear_modules=LINEAR_MODULES,
    parse_config=parse_config, config_to_hf=config_to_hf, embed=embed, block=block, head=head,
    layer_prefix=LAYER_PREFIX, global_rules=GLOBAL_RULES, layer_rules=LAYER_RULES,
    sharding_rules=SHARDING_RULES, init_params=_init_params))
