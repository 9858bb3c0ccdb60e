"""Public pure functions of the hypernetwork editors (HORSE, MALMEN, MEND).

  state = init(cfg, key)                                   fresh hypernetworks + normalizers + Adam
                                                           (`state.init`)
  shifts, state = edit(state, model, cfg, batches)         predict shifts for N edits at once
  edited = apply(model, shifts)                            W + S (kernel layout [d_in, d_out])
  model = revert(model)                                    the original model (nothing to undo)
  state, metrics = train_step(state, model, cfg, edit_b, rephrase_b, loc_b)   one meta-training step

`edit` returns the state too because the normalizer keeps learning from every cached batch, as in the
reference.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from horse_jax.data.tokenize import EditBatch
from horse_jax.editors.hypernet import memo as memo_lib
from horse_jax.editors.hypernet import packing, program
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.state import HypernetState
from horse_jax.models import Model
from horse_jax.models.names import add_to_kernels


def edit(state: HypernetState, model: Model, cfg: HypernetConfig, batches: Sequence[EditBatch],
         mesh=None) -> tuple[dict, HypernetState]:
  """Shifts for all edits in `batches` at once (apply them with `apply`).

  One compiled program (`program.edit_program`) over the packed edits.

  Args:
    state: hypernetworks and normalizers.
    model: the LM (sharded over `mesh` or not).
    cfg: editor config.
    batches: right-padded LM mini-batches of the edits (`edit_batches`).
    mesh: (`data`, `model`) Mesh or None: rows split over `data`, shifts by column over `model`.

  Returns:
    (shifts {name: [d_k, d_v]}, state with updated normalizers).
  """
  packed = packing.Packer(cfg.chunk, _row_multiple(mesh))("edits", batches, cfg.token, True)
  shifts, norms = program.edit_program(state.nets, state.norms, model, program.put(packed, mesh),
                                       cfg, mesh)
  return shifts, state._replace(norms=norms)


def _row_multiple(mesh) -> int:
  return 8 if mesh is None else max(8, mesh.shape["data"])


def apply(model: Model, shifts: dict) -> Model:
  """The edited model: kernel + shift for each edited module."""
  return Model(add_to_kernels(model.params, shifts), model.config)


def revert(original: Model) -> Model:
  """Functional revert: the original model is unchanged, so it is returned as is."""
  return original


def train_step_async(state: HypernetState, model: Model, cfg: HypernetConfig,
                     edits: Sequence[EditBatch], rephrase: Sequence[EditBatch],
                     loc: Sequence[EditBatch], mesh=None, packer: packing.Packer | None = None,
                     memo_rows: memo_lib.MemoRows | None = None,
                     memo: memo_lib.CacheMemo | None = None):
  """Dispatches one meta-training step (`program.train_program`) without waiting for it.

  Args:
    state: current state (donated: do not use it afterwards).
    model: the LM.
    cfg: editor config.
    edits, rephrase, loc: right-padded LM mini-batches of this step's records (`edits` is not
      used when the cache comes from `memo`).
    mesh: (`data`, `model`) Mesh or None.
    packer: a `packing.Packer` kept across steps, so shapes only grow and the program compiles
      once per run; default a fresh one.
    memo_rows, memo: this step's rows of a `memo.CacheMemo` of the training records
      (`memo.step_rows`) and the memo: the cache is then gathered from it
      (`program.train_program_memo`) instead of computed.

  Returns:
    (new state, metrics {"gen_loss", "loc_loss", "grad_norm"} as device scalars).
  """
  packer = packer or packing.Packer(cfg.chunk, _row_multiple(mesh))
  if mesh is not None:  # the program's declared state sharding (a no-op after the first step)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if (memo is None) != (memo_rows is None):
    raise ValueError("memo and memo_rows go together")
  rest = (packer("rephrase", rephrase, cfg.token, False), packer("loc", loc, cfg.token, False))
  rest = tuple(program.put(p, mesh) for p in rest)
  if memo is not None:
    return program.train_program_memo(state, model, memo.arrays, program.put(memo_rows, mesh),
                                      *rest, cfg, mesh)
  edit_set = program.put(packer("edits", edits, cfg.token, True), mesh)
  return program.train_program(state, model, edit_set, *rest, cfg, mesh)


def check_metrics(metrics: dict) -> dict:
  """Device metrics -> floats; FloatingPointError when one is not finite."""
  out = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(v) for v in out.values()):
    raise FloatingPointError(f"non-finite meta-training values {out}")
  return out


def train_step(state: HypernetState, model: Model, cfg: HypernetConfig, edits: Sequence[EditBatch],
               rephrase: Sequence[EditBatch], loc: Sequence[EditBatch], mesh=None,
               packer: packing.Packer | None = None):
  """One meta-training step on one set of N edits (one compiled program; waits for it).

  Returns:
    (new state, metrics {"gen_loss", "loc_loss", "grad_norm"} as floats).
  """
  state, metrics = train_step_async(state, model, cfg, edits, rephrase, loc, mesh, packer)
  return state, check_metrics(metrics)
