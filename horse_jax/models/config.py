"""One hashable config for every supported architecture, parsed from a Hugging Face config.json.

Both config forms are accepted: transformers 4 (`rope_theta`, `rope_scaling` at top level) and
transformers 5 (`rope_parameters`). The original JSON is kept verbatim (`hf_config_json`) so that
export writes back exactly what was read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from horse_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gptj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters, normalised across model families.

  Frozen and hashable so it can be a static argument of jitted functions.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  # Sorted (key, value) pairs of the rope scaling dict, or None for plain rope.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rotary_dim: int | None = None  # GPT-J partial rotary; None = whole head
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)


def _freeze(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


def _rope(hf: dict[str, Any]) -> tuple[float, tuple | None]:
  """Returns (rope_theta, frozen scaling) from either config form."""
  params = hf.get("rope_parameters")
  if params:  # transformers 5
    params = dict(params)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None if rope_type == "default" else params
  else:  # transformers 4
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
      scaling = None
  if scaling is not None:
    scaling = dict(scaling)
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type")
    if scaling["rope_type"] not in ("linear", "llama3"):
      raise UserError(f"unsupported rope scaling type {scaling['rope_type']!r} "
                      "(supported: default, linear, llama3)")
  return theta, _freeze(scaling) if scaling else None


def _sliding_window(hf: dict[str, Any], model_type: str, num_layers: int, source: str) -> int | None:
  """One window for all layers, or None; a per-layer mix (Qwen2 max_window_layers) is rejected."""
  window = hf.get("sliding_window")
  if model_type == "qwen2":
    if not hf.get("use_sliding_window", False):
      return None
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", num_layers)) else "full_attention"
        for i in range(num_layers)]
  else:
    kinds = hf.get("layer_types") or ["sliding_attention" if window else "full_attention"]
  kinds = set(kinds)
  if kinds == {"full_attention"}:
    return None
  if kinds != {"sliding_attention"} or not window:
    raise UserError(f"{source}: sliding window on some layers only (layer_types / "
                    "max_window_layers) is not supported")
  return int(window)


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
  if key not in hf:
    raise UserError(f"{source}: config field {key!r} is missing")
  return hf[key]


SUPPORTED_ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")


def _check_unsupported(hf: dict[str, Any], model_type: str, source: str) -> None:
  """Rejects config options the forward pass does not implement (instead of silently differing)."""
  act = hf.get("hidden_act", hf.get("activation_function"))
  if act is not None and act not in SUPPORTED_ACTIVATIONS:
    raise UserError(f"{source}: unsupported activation {act!r} "
                    f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
  if model_type == "gpt2":
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
      raise UserError(f"{source}: GPT-2 options scale_attn_by_inverse_layer_idx / "
                      "reorder_and_upcast_attn are not supported")
    if hf.get("scale_attn_weights", True) is False:
      raise UserError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config dict.

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.

  Returns:
    The normalised config.

  Raises:
    UserError: unsupported `model_type` or a missing field.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"{source}: unsupported model_type {model_type!r} "
                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  _check_unsupported(hf, model_type, source)
  raw = json.dumps(hf, sort_keys=True)
  eos = hf.get("eos_token_id")
  common = dict(
      model_type=model_type,
      vocab_size=int(_require(hf, "vocab_size", source)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"),
      hf_config_json=raw,
  )
  if model_type in ("llama", "mistral", "qwen2"):
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    theta, scaling = _rope(hf)
    window = _sliding_window(hf, model_type, int(_require(hf, "num_hidden_layers", source)), source)
    return ModelConfig(
        **common,
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and Mistral never has any, whatever the config says.
        attention_bias=(model_type == "qwen2" or
                        (model_type == "llama" and bool(hf.get("attention_bias", False)))),
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        sliding_window=int(window) if window else None,
    )
  if model_type == "gpt2":
    hidden = int(_require(hf, "n_embd", source))
    heads = int(_require(hf, "n_head", source))
    return ModelConfig(
        **common,
        hidden_size=hidden,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        num_layers=int(_require(hf, "n_layer", source)),
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
  # gptj
  hidden = int(_require(hf, "n_embd", source))
  heads = int(_require(hf, "n_head", source))
  return ModelConfig(
      **common,
      hidden_size=hidden,
      intermediate_size=int(hf.get("n_inner") or 4 * hidden),
      num_layers=int(_require(hf, "n_layer", source)),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=hidden // heads,
      max_position_embeddings=int(hf.get("n_positions", 2048)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      hidden_act=hf.get("activation_function", "gelu_new"),
      rope_theta=10000.0,
      rotary_dim=int(hf["rotary_dim"]) if hf.get("rotary_dim") else None,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=False,
      mlp_bias=True,
  )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers config dict for a config that was not read from one (e.g. a random model).

  Written in the transformers-4 form (`rope_theta` / `rope_scaling` at top level), which both
  transformers 4 and 5 read.
  """
  hf: dict[str, Any] = {
      "model_type": cfg.model_type,
      "architectures": [_ARCHITECTURES[cfg.model_type]],
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_word_embeddings,
  }
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    value = getattr(cfg, key)
    if value is not None:
      hf[key] = list(value) if isinstance(value, tuple) else value
  if cfg.model_type in ("llama", "mistral", "qwen2"):
    hf.update(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        hidden_act=cfg.hidden_act, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling_dict)
    if cfg.model_type == "llama":
      hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
      hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "qwen2":
      hf.update(use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window)
    return hf
  hf.update(n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.hidden_act)
  if cfg.model_type == "gptj":
    hf["rotary_dim"] = cfg.rotary_dim
  return hf
