"""Public pure functions of the hypernetwork editors (HORSE, MALMEN, MEND).

  state = init(cfg, key)                                   fresh hypernetworks + normalizers + Adam
  shifts, state = edit(state, model, cfg, batches)         predict shifts for N edits at once
  edited = apply(model, shifts)                            W + S (kernel layout [d_in, d_out])
  model = revert(model)                                    the original model (nothing to undo)
  state, metrics = train_step(state, model, cfg, edit_b, rephrase_b, loc_b)   one meta-training step

`edit` returns the state too because the normalizer keeps learning from every cached batch, as in the
reference.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from horse_jax.data.tokenize import EditBatch

from horse_jax.editors.hypernet import memo as memo_lib
from horse_jax.editors.hypernet import normalizer, packing, program
from horse_jax.editors.hypernet.cache import Cache, build_cache
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.meta import decoupled_grads_jit, shift_loss_grad
from horse_jax.editors.hypernet.network import init_net
from horse_jax.editors.hypernet.shifts import predict_shifts
from horse_jax.errors import UserError
from horse_jax.models import Model
from horse_jax.models.names import add_to_kernels


class HypernetState(NamedTuple):
  """Everything that changes: hypernetworks and normalizers per shape key, Adam state, step."""

  nets: dict
  norms: dict
  opt_state: optax.OptState
  step: jax.Array


def optimizer(cfg: HypernetConfig) -> optax.GradientTransformation:
  """Global-norm clip to `max_grad_norm`, then Adam whose learning rate `meta_lr` is optimizer state
  (`optax.inject_hyperparams`): a run with another meta_lr reuses the compiled training programs."""
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.inject_hyperparams(optax.adam)(learning_rate=cfg.meta_lr))


def with_meta_lr(opt_state, meta_lr) -> optax.OptState:
  """`opt_state` (of `optimizer`) with the learning rate set to `meta_lr`."""
  clip, adam = opt_state
  return clip, adam._replace(hyperparams={**adam.hyperparams,
                                          "learning_rate": jnp.asarray(meta_lr, jnp.float32)})


def init(cfg: HypernetConfig, key: jax.Array) -> HypernetState:
  """Fresh (identity) hypernetworks, empty normalizers, fresh Adam state."""
  nets, norms = {}, {}
  keys = jax.random.split(key, len(set(cfg.shape_keys)))
  for i, skey in enumerate(dict.fromkeys(cfg.shape_keys)):
    dk, dv = cfg.shapes[cfg.shape_keys.index(skey)]
    n_modules = cfg.shape_keys.count(skey)
    nets[skey] = init_net(keys[i], dk + dv, min(cfg.rank, dk + dv), n_modules, cfg.n_blocks, cfg.lr)
    norms[skey] = normalizer.init(dk + dv)
  return HypernetState(nets, norms, optimizer(cfg).init(nets), jnp.zeros((), jnp.int32))


def predict(state: HypernetState, model: Model, cfg: HypernetConfig, batches: Sequence[EditBatch],
            progress: bool = False):
  """Caches the edits and predicts shifts.

  Returns:
    (shifts {name: [d_k, d_v]}, raw value differences, cache, chunk, state with updated normalizers).
  """
  cache, norms, chunk = build_cache(model, state.norms, cfg, batches, progress)
  shifts, diffs = predict_shifts(state.nets, norms, cache, cfg, chunk)
  return shifts, diffs, cache, chunk, state._replace(norms=norms)


def edit(state: HypernetState, model: Model, cfg: HypernetConfig, batches: Sequence[EditBatch],
         mesh=None) -> tuple[dict, HypernetState]:
  """Shifts for all edits in `batches` at once (apply them with `apply`).

  One compiled program (`program.edit_program`) over the packed edits; `predict` is the same
  computation step by step.

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


def meta_loss_grads(model: Model, cfg: HypernetConfig, shifts: dict,
                    rephrase: Sequence[EditBatch], loc: Sequence[EditBatch]):
  """(gen_loss, loc_loss, {name: dLoss/dS}) summed over mini-batches, as the reference does.

  HORSE: loss = sum CE(rephrase) + sum CE(loc gold answers). MALMEN/MEND: loss = sum CE(rephrase) +
  loc_coef * sum KL(pre || post) on the loc answer positions.
  """
  low = cfg.lowest_layer
  total = jax.tree_util.tree_map(jnp.zeros_like, shifts)
  gen, locl = 0.0, 0.0
  for b in rephrase:
    loss, g = shift_loss_grad(model, shifts, b.input_ids, b.attention_mask, b.labels, "ce", low)
    total = jax.tree_util.tree_map(jnp.add, total, g)
    gen += loss
  kind, coef = ("ce", 1.0) if cfg.method == "horse" else ("kl", cfg.loc_coef)
  for b in loc:
    loss, g = shift_loss_grad(model, shifts, b.input_ids, b.attention_mask, b.labels, kind, low)
    total = jax.tree_util.tree_map(lambda a, x: a + coef * x, total, g)
    locl += loss
  return gen, locl, total


def meta_gradients(state: HypernetState, cache: Cache, cfg: HypernetConfig, chunk: int, shifts: dict,
                   diffs: dict, dshifts: dict) -> dict:
  """Decoupled gradients of the hypernetwork params; HORSE/MEND leave lamda untrained."""
  grads = decoupled_grads_jit(state.nets, state.norms, cache, shifts, diffs, dshifts, cfg, chunk)
  if cfg.method != "malmen":
    grads = {k: {**g, "lamda": jnp.zeros_like(g["lamda"])} for k, g in grads.items()}
  return grads


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


def train_step_reference(state: HypernetState, model: Model, cfg: HypernetConfig,
                         edits: Sequence[EditBatch], rephrase: Sequence[EditBatch],
                         loc: Sequence[EditBatch]):
  """`train_step` computed stage by stage (cache per mini-batch, separate jits); for tests.

  Returns:
    (new state, metrics as floats).
  """
  shifts, diffs, cache, chunk, state = predict(state, model, cfg, edits)
  gen, locl, dshifts = meta_loss_grads(model, cfg, shifts, rephrase, loc)
  grads = meta_gradients(state, cache, cfg, chunk, shifts, diffs, dshifts)
  gnorm = optax.tree.norm(grads)
  updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.nets)
  nets = optax.apply_updates(state.nets, updates)
  metrics = {"gen_loss": float(gen), "loc_loss": float(locl), "grad_norm": float(gnorm)}
  if not all(jnp.isfinite(jnp.asarray(v)) for v in metrics.values()):
    raise FloatingPointError(f"non-finite meta-training values {metrics}")
  return HypernetState(nets, state.norms, opt_state, state.step + 1), metrics
