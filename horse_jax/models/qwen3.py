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
  fields = config_lib.decoder_fields(hf, source, head_dim=QWEN3_DEFAULT_HEAD_DIM,
                                     max_positions=32768, norm_eps=1e-6)
  theta, scaling = config_lib.rope_from_hf(hf)
  # Qwen3Config windows the layers from max_window_layers (default 28) on when use_sliding_window.
  window = config_lib.sliding_window_from_hf(hf, fields["num_layers"], source, use_flag=True,
                                             max_window_layers=28)
  return ModelConfig(**fields, rope_theta=theta, rope_scaling=scaling,
                     attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=False,
                     sliding_window=window)


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
