"""Qwen3 (dense): the Llama forward pass plus a per-head RMSNorm on q and k before rope.

Differences from Qwen2 (what transformers' `Qwen3Attention` does): `q_norm` / `k_norm` RMSNorms of
width `head_dim` (eps `rms_norm_eps`) applied to each head of q and k before the rotary embedding;
no q/k/v bias unless `attention_bias` (which then also covers o_proj, as in Llama); an explicit
`head_dim` (transformers' default 128 when the config omits it), GQA, tied or untied embeddings.
Qwen-SEA-LION-v4-32B-IT is one.

Param tree: the Llama one (see `llama.py`) plus
  model.layers.{i}.self_attn.q_norm.scale [head_dim], self_attn.k_norm.scale [head_dim]
"""

from __future__ import annotations

from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, llama, registry
from horse_jax.models.config import ModelConfig

QWEN3_DEFAULT_HEAD_DIM = 128  # Qwen3Config's default


def parse_config(hf: dict, source: str) -> ModelConfig:
  """Qwen3 fields of a config.json."""
  config_lib.check_activation(hf.get("hidden_act"), source)
  heads = int(config_lib.require(hf, "num_attention_heads", source))
  num_layers = int(config_lib.require(hf, "num_hidden_layers", source))
  theta, scaling = config_lib.rope_from_hf(hf)
  # Qwen3Config windows the layers from max_window_layers (default 28) on when use_sliding_window.
  window = config_lib.sliding_window_from_hf(hf, num_layers, source, use_flag=True,
                                             max_window_layers=28)
  return ModelConfig(
      **config_lib.common_fields(hf, source),
      hidden_size=int(config_lib.require(hf, "hidden_size", source)),
      intermediate_size=int(config_lib.require(hf, "intermediate_size", source)),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or QWEN3_DEFAULT_HEAD_DIM),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      hidden_act=hf.get("hidden_act", "silu"),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)),
      mlp_bias=False,
      sliding_window=window,
  )


def _head_dim(c):
  return (c.head_dim,)


LAYER_RULES: tuple[hf_map.Rule, ...] = llama.LAYER_RULES + (
    ("self_attn.q_norm.weight", "self_attn.q_norm.scale", hf_map.COPY, _head_dim, hf_map.always),
    ("self_attn.k_norm.weight", "self_attn.k_norm.scale", hf_map.COPY, _head_dim, hf_map.always),
)

ARCH = registry.register(llama.ARCH._replace(
    name="qwen3",
    model_types=("qwen3",),
    hf_classes={"qwen3": "Qwen3ForCausalLM"},
    parse_config=parse_config,
    layer_rules=LAYER_RULES,
    init_params=None,  # the generic init from the table (it includes q_norm / k_norm)
))
