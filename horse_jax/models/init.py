"""Random initialisation of a param tree from a config (tests, the embedded world model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horse_jax.models.config import ModelConfig
from horse_jax.models.transformer import Model


def _dense(key, d_in, d_out, bias, std, dtype):
  p = {"kernel": (std * jax.random.normal(key, (d_in, d_out), jnp.float32)).astype(dtype)}
  if bias:
    p["bias"] = jnp.zeros((d_out,), dtype)
  return p


def init_llama_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Normal(0, std) kernels, unit norms, zero biases, in the llama-family param layout."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  keys = iter(jax.random.split(key, 2 + 7 * cfg.num_layers))
  ab, mb = cfg.attention_bias, cfg.mlp_bias
  layers = {}
  for i in range(cfg.num_layers):
    layers[str(i)] = {
        "input_layernorm": {"scale": jnp.ones((d,), dtype)},
        "post_attention_layernorm": {"scale": jnp.ones((d,), dtype)},
        "self_attn": {
            "q_proj": _dense(next(keys), d, hq, ab, std, dtype),
            "k_proj": _dense(next(keys), d, hkv, ab, std, dtype),
            "v_proj": _dense(next(keys), d, hkv, ab, std, dtype),
            "o_proj": _dense(next(keys), hq, d, ab and cfg.model_type == "llama", std, dtype),
        },
        "mlp": {
            "gate_proj": _dense(next(keys), d, f, mb, std, dtype),
            "up_proj": _dense(next(keys), d, f, mb, std, dtype),
            "down_proj": _dense(next(keys), f, d, mb, std, dtype),
        },
    }
  params = {"model": {
      "embed_tokens": {"embedding": (std * jax.random.normal(next(keys), (cfg.vocab_size, d))).astype(dtype)},
      "layers": layers,
      "norm": {"scale": jnp.ones((d,), dtype)},
  }}
  head_key = next(keys)
  if not cfg.tie_word_embeddings:
    params["lm_head"] = _dense(head_key, d, cfg.vocab_size, False, std, dtype)
  return params


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Any architecture, from the HF name table: Normal(0, std) kernels and embeddings, unit norm
  scales, zero biases."""
  from horse_jax.models import hf_map
  params: dict = {}
  entries = hf_map.entries(cfg)
  keys = jax.random.split(key, len(entries))
  for k, entry in zip(keys, entries):
    leaf = entry.path.rsplit(".", 1)[1]
    if leaf == "scale":
      value = jnp.ones(entry.shape, dtype)
    elif leaf == "bias":
      value = jnp.zeros(entry.shape, dtype)
    else:
      value = (std * jax.random.normal(k, entry.shape, jnp.float32)).astype(dtype)
    hf_map.set_path(params, entry.path, value)
  return params


def tiny_llama_config(**overrides) -> ModelConfig:
  """A small llama config for tests and examples."""
  fields = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                norm_eps=1e-6)
  fields.update(overrides)
  return ModelConfig(**fields)


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Model:
  """A randomly initialised model (the architecture's `init_params`, else the generic `init_params`)."""
  from horse_jax.models import registry
  key = jax.random.PRNGKey(seed)
  make = registry.get(cfg.model_type).init_params or init_params
  return Model(make(cfg, key, dtype, 0.02), cfg)
