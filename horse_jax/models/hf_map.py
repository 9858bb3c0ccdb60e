"""Declarative map between Hugging Face tensor names and our param tree (tables: one per architecture,
in its module, read through `registry`).

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
from typing import Any, Callable

import jax
import jax.numpy as jnp

from horse_jax.models import registry
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


# Shape helpers (param layout) and presence predicates for the architectures' tables.
def d(c):
  return (c.hidden_size,)


def vd(c):
  return (c.vocab_size, c.hidden_size)


def dv(c):
  return (c.hidden_size, c.vocab_size)


def v(c):
  return (c.vocab_size,)


def q(c):
  return (c.num_heads * c.head_dim,)


def kv(c):
  return (c.num_kv_heads * c.head_dim,)


def f(c):
  return (c.intermediate_size,)


def always(c):
  return True


def untied(c):
  return not c.tie_word_embeddings


# (hf suffix, param suffix, kind, param shape, present?); global rules name whole tensors, layer
# rules are relative to f"{layer_prefix}.{i}".
Rule = tuple[str, str, str, Shape, When]


# Rule builders for the tensors every architecture names the same way (torch module `m`'s
# `m.weight` / `m.bias`).


def linear(module: str, d_in: Shape, d_out: Shape, bias: When | None = None, *,
           kind: str = LINEAR, present: When = always) -> tuple[Rule, ...]:
  """The rules of a linear module: `weight` as our `kernel` [d_in, d_out], and its `bias` [d_out].

  Args:
    module: the module's name, e.g. "self_attn.q_proj".
    d_in, d_out: shape helpers of the input and output widths (e.g. `d`, `q`).
    bias: when the bias exists (None: the module never has one).
    kind: LINEAR (torch [out, in]) or CONV1D (GPT-2, stored [in, out]).
    present: when the module exists at all (e.g. `untied` for lm_head).
  """
  kernel = (f"{module}.weight", f"{module}.kernel", kind, lambda c: d_in(c) + d_out(c), present)
  if bias is None:
    return (kernel,)
  return kernel, (f"{module}.bias", f"{module}.bias", COPY, d_out, lambda c: present(c) and bias(c))


def norm(module: str, bias: bool = False) -> tuple[Rule, ...]:
  """The rules of a norm over the hidden size: `weight` as our `scale`, and (LayerNorm) `bias`."""
  scale = (f"{module}.weight", f"{module}.scale", COPY, d, always)
  return (scale, (f"{module}.bias", f"{module}.bias", COPY, d, always)) if bias else (scale,)


def embedding(module: str, rows: Shape = v) -> Rule:
  """The rule of an embedding table [rows, D] (`weight` as our `embedding`)."""
  return (f"{module}.weight", f"{module}.embedding", COPY, lambda c: rows(c) + d(c), always)


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of a model with this config, in HF order (globals first, then layers)."""
  arch = registry.get(cfg.model_type)
  prefix, global_rules, layer_rules = arch.layer_prefix, arch.global_rules, arch.layer_rules
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


def abstract_params(cfg: ModelConfig, dtype: Any = "float32") -> dict:
  """The param tree of a config as `jax.ShapeDtypeStruct`s (no memory): for plans and size checks.

  Args:
    cfg: the model's config.
    dtype: the weights' dtype ("float32", "bfloat16", ... or a dtype).

  Returns:
    {...: ShapeDtypeStruct} in our layouts, in the name table's order.
  """
  params: dict = {}
  for entry in entries(cfg):
    set_path(params, entry.path, jax.ShapeDtypeStruct(tuple(entry.shape), jnp.dtype(dtype)))
  return params


def get_path(tree: dict, path: str):
  node = tree
  for key in path.split("."):
    node = node[key]
  return node
