"""Declarative tensor-parallel sharding rules over a 2-D device mesh (`data`, `model`).

Megatron layout: projections into the wide space (q/k/v, gate/up, GPT-2 c_attn/c_fc, GPT-J fc_in,
lm_head) are split by output column over `model`; projections back to the residual stream (o_proj,
down_proj, c_proj, out_proj, fc_out) are split by input row, so the pair needs one all-reduce.
Embeddings are split over the vocabulary. Norms and small vectors are replicated. Each architecture
module declares its rule table (`sharding_rules`, read through `registry`; `rules_for`). Params are
replicated over `data`; batches are split over it (`batch_sharding`).

A dimension that the mesh axis does not divide falls back to replicated for that dimension, so any
mesh works with any model (only less sharded). XLA inserts the collectives (Auto axis types).

FSDP (`fsdp=True`): a model too large for one replica per `data` row is also split over `data`: every
matrix gets `data` on its largest dimension that the rules left free and `data` divides (ZeRO-3 style;
XLA all-gathers the slices where a matmul needs them). Vectors stay replicated over `data`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from horse_jax.models.config import ModelConfig

DATA, MODEL = "data", "model"


def megatron_rules(embedding: str, column: tuple[str, ...], row: tuple[str, ...]
                   ) -> tuple[tuple[str, P], ...]:
  """An architecture's tensor-parallel rules in the Megatron layout.

  Projections into the wide space (`column`: q/k/v, gate/up) are split by output column, their
  biases with them; the projections back to the residual stream (`row`: o/down) by input row, so
  each pair costs one all-reduce. The token embedding [V, D] is split over the vocabulary and an
  untied lm_head [D, V] (and its bias) by output column. Everything else is replicated.

  Args:
    embedding: param path of the token embedding, e.g. "model.embed_tokens.embedding".
    column: per-layer module names split by output column, e.g. ("self_attn.q_proj", ...).
    row: per-layer module names split by input row, e.g. ("self_attn.o_proj", "mlp.down_proj").

  Returns:
    ((regex on the dot-joined param path, PartitionSpec), ...) for the architecture's
    `sharding_rules`.
  """
  cols = "|".join(re.escape(m) for m in column)
  rows = "|".join(re.escape(m) for m in row)
  return ((rf"\.({cols})\.kernel$", P(None, MODEL)), (rf"\.({cols})\.bias$", P(MODEL)),
          (rf"\.({rows})\.kernel$", P(MODEL, None)),
          (f"^{re.escape(embedding)}$", P(MODEL, None)), (r"^lm_head\.kernel$", P(None, MODEL)),
          (r"^lm_head\.bias$", P(MODEL)))


def rules_for(cfg: ModelConfig | None) -> tuple[tuple[str, P], ...]:
  """The tensor-parallel rules of an architecture (its module's `sharding_rules`).

  Args:
    cfg: the model config; None = every registered architecture's rules (they key on HF module
      names, which do not collide across architectures).

  Returns:
    ((regex on the dot-joined param path, PartitionSpec), ...): the first match wins.
  """
  from horse_jax.models import registry
  if cfg is not None:
    return registry.get(cfg.model_type).sharding_rules
  return tuple(rule for arch in registry.architectures() for rule in arch.sharding_rules)


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


def fsdp_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` with `data` added on the largest free dimension it divides (matrices only).

  Args:
    spec: the tensor-parallel spec of the param.
    shape: the param shape.
    mesh: the (data, model) mesh.

  Returns:
    The FSDP spec (unchanged for vectors, a 1-wide `data` axis, or no divisible free dimension).
  """
  n = mesh.shape.get(DATA, 1)
  axes = list(spec) + [None] * (len(shape) - len(spec))
  if len(shape) < 2 or n <= 1 or DATA in axes:
    return spec
  free = [i for i, (dim, axis) in enumerate(zip(shape, axes)) if axis is None and dim % n == 0]
  if not free:
    return spec
  best = max(free, key=lambda i: (shape[i], -i))  # the largest dimension; the first on ties
  axes[best] = DATA
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp: bool = False, *,
             rules=None) -> P:
  """The PartitionSpec of one param (rules, then divisibility fallback, then FSDP if asked).

  `rules` default to every architecture's (`rules_for(None)`).
  """
  spec = P()
  for pattern, rule in (rules_for(None) if rules is None else rules):
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
  spec = P(*fixed)
  return fsdp_spec(spec, shape, mesh) if fsdp else spec


def sharding_for(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp: bool = False, *,
                 rules=None) -> NamedSharding:
  return NamedSharding(mesh, spec_for(path, shape, mesh, fsdp, rules=rules))


def param_shardings(params: dict, mesh: Mesh, fsdp: bool = False, *, rules=None) -> dict:
  """A pytree of NamedSharding matching `params` (leaves may be arrays or ShapeDtypeStructs)."""
  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    return sharding_for(path, tuple(node.shape), mesh, fsdp, rules=rules)
  return walk(params, "")


def shard_params(params: dict, cfg: ModelConfig | None, mesh: Mesh, fsdp: bool = False) -> dict:
  """Places each param on the mesh according to the rules.

  Args:
    params: the param tree.
    cfg: the model config (selects its architecture's rules; None = all architectures').
    mesh: a (data, model) mesh, e.g. from `make_mesh`.
    fsdp: also split matrices over `data` (see `fsdp_spec`).

  Returns:
    The same tree with sharded arrays.
  """
  return jax.device_put(params, param_shardings(params, mesh, fsdp, rules=rules_for(cfg)))


def shard_model(model: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """`Model` with its params sharded (see `shard_params`)."""
  from horse_jax.models.transformer import Model
  return Model(shard_params(model.params, model.config, mesh, fsdp), model.config)


def replica_bytes(params: dict, mesh: Mesh) -> int:
  """Bytes of params one device holds with tensor-parallel rules only (no FSDP)."""
  total = 0
  for path, leaf in _leaves(params):
    spec = spec_for(path, tuple(leaf.shape), mesh)
    n = int(np.prod([mesh.shape[a] for a in spec if a is not None] or [1]))
    total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize // n
  return total


def _leaves(params: dict, prefix: str = ""):
  for k, v in params.items():
    path = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      yield from _leaves(v, path)
    else:
      yield path, v


def want_fsdp(setting: Any, params: dict, mesh: Mesh, device_bytes: int | None) -> bool:
  """Resolves `sharding.fsdp: true|false|auto`.

  Args:
    setting: True/False/"auto" (strings "true"/"false" accepted).
    params: the param tree (arrays or ShapeDtypeStructs).
    mesh: the mesh.
    device_bytes: memory of one device, or None when unknown (auto then means off).

  Returns:
    Whether to shard over `data` too: auto = on when the tensor-parallel replica takes more than
    half a device (the rest is needed for activations and the editor's caches and solves).
  """
  if isinstance(setting, str):
    setting = {"true": True, "false": False, "auto": "auto"}.get(setting.lower(), setting)
  if setting is True or setting is False:
    return setting
  if setting != "auto":
    from horse_jax.errors import UserError
    raise UserError(f"sharding.fsdp must be true, false or auto, not {setting!r}")
  if mesh.shape.get(DATA, 1) <= 1 or not device_bytes:
    return False
  return replica_bytes(params, mesh) > device_bytes // 2


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding for [B, ...] inputs: batch over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (rank - 1))))
