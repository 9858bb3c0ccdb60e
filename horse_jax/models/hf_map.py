"""Declarative map between Hugging Face tensor names and our param tree, one table per architecture.

Each rule says: HF tensor `hf` <-> param path `path` (dot-joined), how the tensor is laid out
(`kind`), the param shape as a function of the config, and when the tensor exists. Loading, export,
random initialisation and shape checks all read the same table, so they cannot drift apart.

Kinds:
  LINEAR  torch `nn.Linear.weight` [out, in]; our kernel is its transpose [in, out].
  CONV1D  GPT-2 `Conv1D.weight`, already [in, out]; copied as is.
  COPY    embeddings [V, D], norm scales and biases; copied as is.

Tensors that are not parameters (GPT-2 `attn.bias` / `attn.masked_bias` causal buffers, rotary
`inv_freq`) are simply not in the table, so they are ignored when reading and never written.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from horse_jax.models.config import ModelConfig

LINEAR, CONV1D, COPY = "linear", "conv1d", "copy"

Shape = Callable[[ModelConfig], tuple[int, ...]]
When = Callable[[ModelConfig], bool]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a concrete model: HF name, param path, layout kind and param shape."""

  hf_name: str
  path: str  # dot-joined param path, e.g. "model.layers.0.mlp.down_proj.kernel"
  kind: str
  shape: tuple[int, ...]  # our (param) shape; the HF shape is reversed for LINEAR

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.shape)) if self.kind == LINEAR else self.shape


# Shape helpers (param layout).
def _d(c):
  return (c.hidden_size,)


def _vd(c):
  return (c.vocab_size, c.hidden_size)


def _dv(c):
  return (c.hidden_size, c.vocab_size)


def _v(c):
  return (c.vocab_size,)


def _q(c):
  return (c.num_heads * c.head_dim,)


def _kv(c):
  return (c.num_kv_heads * c.head_dim,)


def _f(c):
  return (c.intermediate_size,)


def _always(c):
  return True


def _untied(c):
  return not c.tie_word_embeddings


def _qkv_bias(c):
  return c.attention_bias and c.model_type in ("llama", "qwen2")


def _o_bias(c):  # Qwen2 has biases on q/k/v only; Llama's `attention_bias` covers o_proj too.
  return c.attention_bias and c.model_type == "llama"


def _mlp_bias(c):
  return c.mlp_bias and c.model_type == "llama"


# (hf suffix, param suffix, kind, param shape, present?)
Rule = tuple[str, str, str, Shape, When]

_LLAMA_GLOBAL: tuple[Rule, ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", COPY, _vd, _always),
    ("model.norm.weight", "model.norm.scale", COPY, _d, _always),
    ("lm_head.weight", "lm_head.kernel", LINEAR, _dv, _untied),
)
_LLAMA_LAYER: tuple[Rule, ...] = (
    ("input_layernorm.weight", "input_layernorm.scale", COPY, _d, _always),
    ("post_attention_layernorm.weight", "post_attention_layernorm.scale", COPY, _d, _always),
    ("self_attn.q_proj.weight", "self_attn.q_proj.kernel", LINEAR, lambda c: _d(c) + _q(c), _always),
    ("self_attn.q_proj.bias", "self_attn.q_proj.bias", COPY, _q, _qkv_bias),
    ("self_attn.k_proj.weight", "self_attn.k_proj.kernel", LINEAR, lambda c: _d(c) + _kv(c), _always),
    ("self_attn.k_proj.bias", "self_attn.k_proj.bias", COPY, _kv, _qkv_bias),
    ("self_attn.v_proj.weight", "self_attn.v_proj.kernel", LINEAR, lambda c: _d(c) + _kv(c), _always),
    ("self_attn.v_proj.bias", "self_attn.v_proj.bias", COPY, _kv, _qkv_bias),
    ("self_attn.o_proj.weight", "self_attn.o_proj.kernel", LINEAR, lambda c: _q(c) + _d(c), _always),
    ("self_attn.o_proj.bias", "self_attn.o_proj.bias", COPY, _d, _o_bias),
    ("mlp.gate_proj.weight", "mlp.gate_proj.kernel", LINEAR, lambda c: _d(c) + _f(c), _always),
    ("mlp.gate_proj.bias", "mlp.gate_proj.bias", COPY, _f, _mlp_bias),
    ("mlp.up_proj.weight", "mlp.up_proj.kernel", LINEAR, lambda c: _d(c) + _f(c), _always),
    ("mlp.up_proj.bias", "mlp.up_proj.bias", COPY, _f, _mlp_bias),
    ("mlp.down_proj.weight", "mlp.down_proj.kernel", LINEAR, lambda c: _f(c) + _d(c), _always),
    ("mlp.down_proj.bias", "mlp.down_proj.bias", COPY, _d, _mlp_bias),
)

_GPT2_GLOBAL: tuple[Rule, ...] = (
    ("transformer.wte.weight", "transformer.wte.embedding", COPY, _vd, _always),
    ("transformer.wpe.weight", "transformer.wpe.embedding", COPY,
     lambda c: (c.max_position_embeddings, c.hidden_size), _always),
    ("transformer.ln_f.weight", "transformer.ln_f.scale", COPY, _d, _always),
    ("transformer.ln_f.bias", "transformer.ln_f.bias", COPY, _d, _always),
    ("lm_head.weight", "lm_head.kernel", LINEAR, _dv, _untied),
)
_GPT2_LAYER: tuple[Rule, ...] = (
    ("ln_1.weight", "ln_1.scale", COPY, _d, _always),
    ("ln_1.bias", "ln_1.bias", COPY, _d, _always),
    ("attn.c_attn.weight", "attn.c_attn.kernel", CONV1D, lambda c: (c.hidden_size, 3 * c.hidden_size),
     _always),
    ("attn.c_attn.bias", "attn.c_attn.bias", COPY, lambda c: (3 * c.hidden_size,), _always),
    ("attn.c_proj.weight", "attn.c_proj.kernel", CONV1D, lambda c: _d(c) + _d(c), _always),
    ("attn.c_proj.bias", "attn.c_proj.bias", COPY, _d, _always),
    ("ln_2.weight", "ln_2.scale", COPY, _d, _always),
    ("ln_2.bias", "ln_2.bias", COPY, _d, _always),
    ("mlp.c_fc.weight", "mlp.c_fc.kernel", CONV1D, lambda c: _d(c) + _f(c), _always),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", COPY, _f, _always),
    ("mlp.c_proj.weight", "mlp.c_proj.kernel", CONV1D, lambda c: _f(c) + _d(c), _always),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", COPY, _d, _always),
)

_GPTJ_GLOBAL: tuple[Rule, ...] = (
    ("transformer.wte.weight", "transformer.wte.embedding", COPY, _vd, _always),
    ("transformer.ln_f.weight", "transformer.ln_f.scale", COPY, _d, _always),
    ("transformer.ln_f.bias", "transformer.ln_f.bias", COPY, _d, _always),
    ("lm_head.weight", "lm_head.kernel", LINEAR, _dv, _untied),
    ("lm_head.bias", "lm_head.bias", COPY, _v, _untied),
)
_GPTJ_LAYER: tuple[Rule, ...] = (
    ("ln_1.weight", "ln_1.scale", COPY, _d, _always),
    ("ln_1.bias", "ln_1.bias", COPY, _d, _always),
    ("attn.q_proj.weight", "attn.q_proj.kernel", LINEAR, lambda c: _d(c) + _d(c), _always),
    ("attn.k_proj.weight", "attn.k_proj.kernel", LINEAR, lambda c: _d(c) + _d(c), _always),
    ("attn.v_proj.weight", "attn.v_proj.kernel", LINEAR, lambda c: _d(c) + _d(c), _always),
    ("attn.out_proj.weight", "attn.out_proj.kernel", LINEAR, lambda c: _d(c) + _d(c), _always),
    ("mlp.fc_in.weight", "mlp.fc_in.kernel", LINEAR, lambda c: _d(c) + _f(c), _always),
    ("mlp.fc_in.bias", "mlp.fc_in.bias", COPY, _f, _always),
    ("mlp.fc_out.weight", "mlp.fc_out.kernel", LINEAR, lambda c: _f(c) + _d(c), _always),
    ("mlp.fc_out.bias", "mlp.fc_out.bias", COPY, _d, _always),
)

# model_type -> (layer prefix, global rules, per-layer rules)
TABLES: dict[str, tuple[str, tuple[Rule, ...], tuple[Rule, ...]]] = {
    "llama": ("model.layers", _LLAMA_GLOBAL, _LLAMA_LAYER),
    "mistral": ("model.layers", _LLAMA_GLOBAL, _LLAMA_LAYER),
    "qwen2": ("model.layers", _LLAMA_GLOBAL, _LLAMA_LAYER),
    "gpt2": ("transformer.h", _GPT2_GLOBAL, _GPT2_LAYER),
    "gptj": ("transformer.h", _GPTJ_GLOBAL, _GPTJ_LAYER),
}


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of a model with this config, in HF order (globals first, then layers)."""
  prefix, global_rules, layer_rules = TABLES[cfg.model_type]
  out = []
  for hf, path, kind, shape, when in global_rules:
    if when(cfg):
      out.append(Entry(hf, path, kind, tuple(shape(cfg))))
  for i in range(cfg.num_layers):
    for hf, path, kind, shape, when in layer_rules:
      if when(cfg):
        out.append(Entry(f"{prefix}.{i}.{hf}", f"{prefix}.{i}.{path}", kind, tuple(shape(cfg))))
  return out


def set_path(tree: dict, path: str, value) -> None:
  """tree[a][b][c] = value for path "a.b.c", creating dicts on the way."""
  *parents, leaf = path.split(".")
  node = tree
  for key in parents:
    node = node.setdefault(key, {})
  node[leaf] = value


def get_path(tree: dict, path: str):
  node = tree
  for key in path.split("."):
    node = node[key]
  return node
