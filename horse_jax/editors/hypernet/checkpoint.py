"""Saving and loading hypernetworks (orbax): the final `hypernet/` folder and training checkpoints.

A hypernet folder holds `hypernet.json` (the static `HypernetConfig` and the settings it was trained
with) and `state/` (an orbax checkpoint of the hypernetworks and normalizers). Training checkpoints
(`orbax.checkpoint.CheckpointManager`, a few kept) also hold the Adam state and the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig, module_shapes
from horse_jax.editors.hypernet.state import HypernetState, init, with_meta_lr
from horse_jax.errors import UserError
from horse_jax.distributed import atomic_directory_all_processes, is_main, to_host
from horse_jax.io import atomic_write_json

CONFIG_FILE = "hypernet.json"


def to_tree(state: HypernetState, with_opt: bool = True) -> dict:
  """A plain-dict pytree of the state (what orbax writes)."""
  tree = {"nets": state.nets,
          "norms": {k: {"n": s.n, "mean": s.mean, "var": s.var} for k, s in state.norms.items()}}
  if with_opt:
    tree["opt_state"] = state.opt_state
    tree["step"] = state.step
  return tree


def from_tree(tree: dict, template: HypernetState) -> HypernetState:
  norms = {k: normalizer.NormState(v["n"], v["mean"], v["var"]) for k, v in tree["norms"].items()}
  opt_state = tree.get("opt_state", template.opt_state)
  # meta_lr lives in the optimizer state: the run's value (the template's) wins over the saved one.
  opt_state = with_meta_lr(opt_state, template.opt_state[1].hyperparams["learning_rate"])
  return HypernetState(tree["nets"], norms, opt_state, tree.get("step", template.step))


def _abstract(tree, mesh=None):
  """Shapes and dtypes of `tree` with their shardings (or, given a mesh, replicated over it)."""
  if mesh is None:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)


def _params_mesh(params):
  """The mesh a model's weights are sharded over (None: not on a mesh)."""
  for leaf in jax.tree_util.tree_leaves(params):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def save_hypernet(path: str | os.PathLike, cfg: HypernetConfig, state: HypernetState,
                  settings: dict[str, Any] | None = None) -> None:
  """Writes a hypernet folder atomically (replaced whole on success).

  Multi-host: every process calls this with the same `path` (orbax saves collectively and writes
  each replicated array once); process 0 writes hypernet.json and swaps the folder in.

  Args:
    path: the hypernet folder (replaced if it exists).
    cfg: the static config written to hypernet.json.
    state: the trained state (multi-host: arrays replicated over the global mesh).
    settings: the settings it was trained with (for the record).
  """
  step = int(to_host(state.step))
  with atomic_directory_all_processes(os.path.abspath(os.fspath(path))) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "state"), to_tree(state, with_opt=False))
    ckptr.wait_until_finished()
    if is_main():
      atomic_write_json(os.path.join(tmp, CONFIG_FILE),
                        {"config": cfg.to_dict(), "settings": settings or {}, "step": step})


def load_hypernet(path: str | os.PathLike, mesh=None) -> tuple[HypernetConfig, HypernetState, dict]:
  """(config, state with a fresh optimizer, settings) from a hypernet folder.

  Args:
    path: hypernet folder.
    mesh: restore the arrays replicated over this mesh (it may span processes), so that programs on
      a sharded model take them; None: on one device.
  """
  path = os.path.abspath(os.fspath(path))
  meta_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(meta_file):
    raise UserError(f"{path}: not a hypernet folder (no {CONFIG_FILE})")
  with open(meta_file, encoding="utf-8") as f:
    meta = json.load(f)
  cfg = HypernetConfig.from_dict(meta["config"])
  template = init(cfg, jax.random.PRNGKey(0))
  target = _abstract(to_tree(template, with_opt=False), mesh)
  tree = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
  state = from_tree(tree, template)
  return cfg, state._replace(step=jnp.asarray(meta.get("step", 0), jnp.int32)), meta.get("settings", {})


def load_for_editing(path: str | os.PathLike, method: str, model, chunk: int,
                     lm_batch: int | None = None, where: str | None = None):
  """A trained hypernetwork, checked against `method` and `model`, set up to edit with.

  The token chunk is compute layout and may change freely. The LM mini-batch size stays the one the
  hypernetwork was trained with unless `lm_batch` is given: value gradients are token means over a
  mini-batch, so their scale (which the hypernetwork and its normalizer learned) depends on it.

  Args:
    path: hypernet folder.
    method: the method it must have been trained for.
    model: the LM it will edit (its module shapes must match).
    chunk: token chunk (`editor.batch_size`).
    lm_batch: LM mini-batch size the user asked for, or None to keep the trained one.
    where: what to name in errors (default the path).

  Returns:
    (cfg, state).
  """
  where = where or str(path)
  cfg, state, _ = load_hypernet(path, _params_mesh(model.params))
  if cfg.method != method:
    raise UserError(f"{where}: trained for {cfg.method!r}, not {method!r}")
  shapes = module_shapes(model.params, cfg.modules)
  if shapes != cfg.shapes:
    raise UserError(f"{where}: module shapes {cfg.shapes} do not match the model's {shapes}")
  return dataclasses.replace(cfg, lm_batch=int(lm_batch) if lm_batch else cfg.lm_batch,
                             chunk=int(chunk)), state


def manager(folder: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A CheckpointManager for training checkpoints under `folder` (multi-host: every process makes
  one for the same folder)."""
  return ocp.CheckpointManager(os.path.abspath(os.fspath(folder)),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def save_step(mgr: ocp.CheckpointManager, state: HypernetState) -> None:
  """Saves the full training state at its step and waits until it is on disk.

  Multi-host: every process calls this (orbax's save is collective; each replicated array is written
  once and process 0 finalizes the step folder).
  """
  mgr.save(int(to_host(state.step)), args=ocp.args.StandardSave(to_tree(state)))
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, template: HypernetState) -> HypernetState | None:
  """The latest checkpointed state (None when there is none), placed like `template`'s arrays
  (multi-host: give a template replicated over the global mesh, `distributed.replicate`)."""
  step = mgr.latest_step()
  if step is None:
    return None
  tree = mgr.restore(step, args=ocp.args.StandardRestore(_abstract(to_tree(template))))
  return from_tree(tree, template)
