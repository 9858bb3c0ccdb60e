"""Declarative tensor-parallel sharding rules over a 2-D device mesh (`data`, `model`).

Megatron layout: projections into the wide space (q/k/v, gate/up, GPT-2 c_attn/c_fc, GPT-J fc_in,
lm_head) are split by output column over `model`; projections back to the residual stream (o_proj,
down_proj, c_proj, out_proj, fc_out) are split by input row, so the pair needs one all-reduce.
Embeddings are split over the vocabulary. Norms and small vectors are replicated. Params are
replicated over `data`; batches are split over it (`batch_sharding`).

A dimension that the mesh axis does not divide falls back to replicated for that dimension, so any
mesh works with any model (only less sharded). XLA inserts the collectives (Auto axis types).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from horse_jax.models.config import ModelConfig

DATA, MODEL = "data", "model"

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|c_attn|c_fc|fc_in)"
_ROW = r"(o_proj|down_proj|out_proj|fc_out|attn\.c_proj|mlp\.c_proj)"

# (regex on the dot-joined param path, spec); the first match wins; no match = replicated.
RULES: tuple[tuple[str, P], ...] = (
    (rf"\.{_COLUMN}\.kernel$", P(None, MODEL)),
    (rf"\.{_COLUMN}\.bias$", P(MODEL)),
    (rf"\.{_ROW}\.kernel$", P(MODEL, None)),
    (r"(embed_tokens|wte)\.embedding$", P(MODEL, None)),
    (r"^lm_head\.kernel$", P(None, MODEL)),
    (r"^lm_head\.bias$", P(MODEL)),
)


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
  """A (data, model) mesh with Auto axis types (XLA propagates shardings and adds collectives).

  Args:
    data: data-parallel size.
    model: tensor-parallel size; default all remaining devices.
    devices: devices to use; default `jax.devices()`.

  Returns:
    The mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model is None:
    model = len(devices) // data
  if data * model > len(devices) or data < 1 or model < 1:
    from horse_jax.errors import UserError
    raise UserError(f"mesh {data}x{model} needs {data * model} devices; {len(devices)} available")
  devices = devices[:data * model]
  try:
    from jax.sharding import AxisType
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)
  except (ImportError, TypeError):  # older JAX: no axis types / no devices argument
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of one param (rules, then divisibility fallback)."""
  spec = P()
  for pattern, rule in RULES:
    if re.search(pattern, path):
      spec = rule
      break
  axes = list(spec) + [None] * (len(shape) - len(spec))
  fixed = []
  for dim, axis in zip(shape, axes[:len(shape)]):
    if axis is not None and (axis not in mesh.shape or dim % mesh.shape[axis] != 0):
      axis = None
    fixed.append(axis)
  while fixed and fixed[-1] is None:
    fixed.pop()
  return P(*fixed)


def sharding_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, spec_for(path, shape, mesh))


def param_shardings(params: dict, mesh: Mesh) -> dict:
  """A pytree of NamedSharding matching `params`."""
  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    return sharding_for(path, tuple(node.shape), mesh)
  return walk(params, "")


def shard_params(params: dict, cfg: ModelConfig | None, mesh: Mesh) -> dict:
  """Places each param on the mesh according to the rules.

  Args:
    params: the param tree.
    cfg: the model config (unused today: the rules key on HF module names, which are unambiguous).
    mesh: a (data, model) mesh, e.g. from `make_mesh`.

  Returns:
    The same tree with sharded arrays.
  """
  del cfg
  return jax.device_put(params, param_shardings(params, mesh))


def shard_model(model: Any, mesh: Mesh) -> Any:
  """`Model` with its params sharded (see `shard_params`)."""
  from horse_jax.models.transformer import Model
  return Model(shard_params(model.params, model.config, mesh), model.config)


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding for [B, ...] inputs: batch over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (rank - 1))))
