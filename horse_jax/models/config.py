"""One hashable config for every supported architecture, parsed from a Hugging Face config.json.

Both config forms are accepted: transformers 4 (`rope_theta`, `rope_scaling` at top level) and
transformers 5 (`rope_parameters`). The original JSON is kept verbatim (`hf_config_json`) so that
export writes back exactly what was read.

Which fields a config.json has depends on the architecture: `config_from_hf` dispatches on
`model_type` to the architecture module's `parse_config` (see `registry`), which builds the
ModelConfig with the shared helpers below (`common_fields`, `decoder_fields`, `gpt2_fields`,
`require`, `rope_from_hf`, `sliding_window_from_hf`, `check_activation`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from horse_jax.errors import UserError


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


# Shared parsing helpers for the architecture modules' `parse_config`.


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple | None]:
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


def sliding_window_from_hf(hf: dict[str, Any], num_layers: int, source: str, *,
                           use_flag: bool = False, max_window_layers: int | None = None
                           ) -> int | None:
  """One window for all layers, or None; a per-layer mix (`layer_types`) is rejected.

  Args:
    hf: the parsed config.json.
    num_layers: number of decoder layers.
    source: for error messages.
    use_flag: Qwen2/Qwen3 form: the window applies only when `use_sliding_window` is true, to the
      layers from `max_window_layers` on.
    max_window_layers: the default of `max_window_layers` when the config omits it (None = all
      layers windowed).
  """
  window = hf.get("sliding_window")
  if use_flag:
    if not hf.get("use_sliding_window", False):
      return None
    first = hf.get("max_window_layers", max_window_layers)
    first = 0 if first is None else int(first)
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
  else:
    kinds = hf.get("layer_types") or ["sliding_attention" if window else "full_attention"]
  kinds = set(kinds)
  if kinds == {"full_attention"}:
    return None
  if kinds != {"sliding_attention"} or not window:
    raise UserError(f"{source}: sliding window on some layers only (layer_types / "
                    "max_window_layers) is not supported")
  return int(window)


def require(hf: dict[str, Any], key: str, source: str) -> Any:
  """hf[key], or a UserError naming the missing field."""
  if key not in hf:
    raise UserError(f"{source}: config field {key!r} is missing")
  return hf[key]


SUPPORTED_ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")


def check_activation(act: Any, source: str) -> None:
  """Rejects an activation the forward pass does not implement (instead of silently differing)."""
  if act is not None and act not in SUPPORTED_ACTIVATIONS:
    raise UserError(f"{source}: unsupported activation {act!r} "
                    f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")


def common_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """The ModelConfig fields every architecture reads the same way (model type, vocabulary,
  special tokens, the verbatim JSON)."""
  eos = hf.get("eos_token_id")
  return dict(
      model_type=hf["model_type"],
      vocab_size=int(require(hf, "vocab_size", source)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"),
      hf_config_json=json.dumps(hf, sort_keys=True),
  )


def decoder_fields(hf: dict[str, Any], source: str, *, head_dim: int | None,
                   max_positions: int, norm_eps: float) -> dict[str, Any]:
  """The ModelConfig fields of a config.json with transformers' decoder names (`hidden_size`,
  `num_hidden_layers`, `num_attention_heads`, `rms_norm_eps`, ...: Llama, Qwen, gpt-oss), plus
  `common_fields`. Rope, windows and biases differ per architecture and are left to it.

  Args:
    hf: the parsed config.json.
    source: for error messages.
    head_dim: the head width when the config omits it (None: hidden_size // num_attention_heads).
    max_positions, norm_eps: the architecture's defaults of `max_position_embeddings` and
      `rms_norm_eps`.
  """
  hidden = int(require(hf, "hidden_size", source))
  heads = int(require(hf, "num_attention_heads", source))
  return dict(
      **common_fields(hf, source),
      hidden_size=hidden,
      intermediate_size=int(require(hf, "intermediate_size", source)),
      num_layers=int(require(hf, "num_hidden_layers", source)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or head_dim or hidden // heads),
      max_position_embeddings=int(hf.get("max_position_embeddings", max_positions)),
      norm_eps=float(hf.get("rms_norm_eps", norm_eps)),
      hidden_act=str(hf.get("hidden_act", "silu")),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def decoder_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json fields `decoder_fields` reads (and the rope ones), for a config built in code."""
  return dict(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
      hidden_act=cfg.hidden_act, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling_dict)


def gpt2_fields(hf: dict[str, Any], source: str, *, max_positions: int,
                tie_word_embeddings: bool) -> dict[str, Any]:
  """The ModelConfig fields of a config.json with GPT-2's names (`n_embd`, `n_head`, `n_layer`,
  `n_inner`, `n_positions`, `layer_norm_epsilon`, `activation_function`: GPT-2, GPT-J), plus
  `common_fields`. Every head has its own keys and values.

  Args:
    hf: the parsed config.json.
    source: for error messages.
    max_positions, tie_word_embeddings: the architecture's defaults of `n_positions` and
      `tie_word_embeddings`.
  """
  check_activation(hf.get("activation_function"), source)
  hidden = int(require(hf, "n_embd", source))
  heads = int(require(hf, "n_head", source))
  return dict(
      **common_fields(hf, source),
      hidden_size=hidden,
      intermediate_size=int(hf.get("n_inner") or 4 * hidden),
      num_layers=int(require(hf, "n_layer", source)),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=hidden // heads,
      max_position_embeddings=int(hf.get("n_positions", max_positions)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      hidden_act=hf.get("activation_function", "gelu_new"),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_word_embeddings)),
  )


def gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json fields `gpt2_fields` reads, for a config built in code."""
  return dict(n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
              layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.hidden_act)


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config dict.

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.

  Returns:
    The normalised config.

  Raises:
    UserError: unsupported `model_type` or option, or a missing field.
  """
  from horse_jax.models import registry
  arch = registry.get(hf.get("model_type"), source)
  return arch.parse_config(hf, source)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers config dict for a config that was not read from one (e.g. a random model).

  Written in the transformers-4 form (`rope_theta` / `rope_scaling` at top level), which both
  transformers 4 and 5 read.
  """
  from horse_jax.models import registry
  arch = registry.get(cfg.model_type)
  hf: dict[str, Any] = {
      "model_type": cfg.model_type,
      "architectures": [arch.hf_classes[cfg.model_type]],
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_word_embeddings,
  }
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    value = getattr(cfg, key)
    if value is not None:
      hf[key] = list(value) if isinstance(value, tuple) else value
  hf.update(arch.config_to_hf(cfg))
  return hf
