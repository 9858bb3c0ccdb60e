"""The hypernetwork editors stage by stage: the oracle the compiled programs are checked against.

The library runs HORSE / MALMEN / MEND as compiled programs over packed sequences
(`hypernet.program`). This module computes the same edit and meta-training step the way the
reference implementations do, one stage and one jitted call at a time, on right-padded mini-batches:

  1. `build_cache`: for each LM mini-batch, keys (inputs of the edited modules) and value gradients
     (d of the token-mean CE w.r.t. a zero offset on their outputs) at the cached positions
     (`packing.token_mask`), and the normalizer updated module by module in config order;
  2. `predict_shifts`: hypernetwork, spread and ridge solves from that cache (`shifts.solve_stacked`
     on per-module dicts);
  3. `meta_loss_grads`: the edited model's rephrase / locality losses and dLoss/dS per mini-batch
     (`shift_loss_grad`, on the standard padded forward);
  4. `meta_gradients`: the decoupled backward (`meta.decoupled_grads_stacked`);
  5. `train_step_reference`: clip + Adam (`state.optimizer`).

Only tests import it. test_hypernet_shifts.py checks it against NumPy float64 and test_hypernet_meta.py
against `jax.grad` end to end; test_hypernet_program.py checks the programs against it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from horse_jax.data.tokenize import IGNORE, EditBatch, bucket_length
from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet import shifts as shifts_lib
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.meta import decoupled_grads_stacked
from horse_jax.editors.hypernet.packing import padded_rows, token_mask
from horse_jax.editors.hypernet.state import HypernetState, optimizer
from horse_jax.models import Hooks, Model, forward_from, hidden_before
from horse_jax.models.names import add_to_kernels


class Cache(NamedTuple):
  """Per-module rows for one set of edits (all modules share the row layout).

  Attributes:
    keys: name -> [R, d_k] float32 (zero on padding rows).
    grads: name -> [R, d_v] float32 value gradients (zero on padding rows).
    valid: [R] float32, 1 on real rows.
  """

  keys: dict
  grads: dict
  valid: jax.Array


def token_ce(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Token-mean cross-entropy over positions with label != -100 (labels aligned with logits)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  use = labels_BxT != IGNORE
  safe = jnp.where(use, labels_BxT, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(use, nll, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def token_kl(pre_logits_BxTxV, post_logits_BxTxV, labels_BxT) -> jax.Array:
  """KL(pre || post) summed over the vocabulary, averaged over positions with label != -100."""
  pre = jax.nn.log_softmax(pre_logits_BxTxV.astype(jnp.float32), axis=-1)
  post = jax.nn.log_softmax(post_logits_BxTxV.astype(jnp.float32), axis=-1)
  kl_BxT = jnp.sum(jnp.exp(pre) * (pre - post), axis=-1)
  use = labels_BxT != IGNORE
  return jnp.sum(jnp.where(use, kl_BxT, 0.0)) / jnp.maximum(jnp.sum(use), 1)


# ---------------------------------------------------------------- 1. cache, mini-batch by mini-batch

@functools.partial(jax.jit, static_argnames=("modules", "shapes"))
def cache_batch(model: Model, norms: dict, modules: tuple, shapes: tuple, input_ids, attention_mask,
                labels, rows_R, valid_R):
  """Keys/value grads of one mini-batch at flat positions `rows_R`, and the updated normalizers."""
  b, t = input_ids.shape
  cfg = HypernetConfig(method="malmen", modules=modules, shapes=shapes)  # for its derived fields
  low = cfg.lowest_layer
  h = hidden_before(model, low, input_ids, attention_mask)
  zeros = {n: jnp.zeros((b, t, dv), jnp.float32) for n, (_, dv) in zip(cfg.modules, cfg.shapes)}

  def loss_fn(offsets):
    out = forward_from(model, low, h, attention_mask, hooks=Hooks(capture=cfg.modules, offsets=offsets))
    return token_ce(out.logits, labels), out.captured

  grads, captured = jax.grad(loss_fn, has_aux=True)(zeros)
  v = valid_R.astype(jnp.float32)[:, None]
  keys_out, grads_out = {}, {}
  norms = dict(norms)
  for name, (dk, dv), skey in zip(cfg.modules, cfg.shapes, cfg.shape_keys):
    k = captured[name].reshape(b * t, dk).astype(jnp.float32)[rows_R] * v
    g = grads[name].reshape(b * t, dv).astype(jnp.float32)[rows_R] * v
    keys_out[name], grads_out[name] = k, g
    norms[skey] = normalizer.update(norms[skey], jnp.concatenate([k, g], axis=-1), valid_R)
  return keys_out, grads_out, norms


def build_cache(model: Model, norms: dict, cfg: HypernetConfig,
                batches: Sequence[EditBatch]) -> tuple[Cache, dict, int]:
  """Caches every mini-batch and concatenates the rows.

  Returns:
    (Cache with R rows padded per `packing.padded_rows`, updated norms, chunk to use).
  """
  keys = {n: [] for n in cfg.modules}
  grads = {n: [] for n in cfg.modules}
  valid = []
  for batch in batches:
    flat = np.nonzero(token_mask(batch, cfg.token).reshape(-1))[0]
    size = bucket_length(len(flat), minimum=8)
    rows = np.zeros((size,), np.int32)
    rows[:len(flat)] = flat
    ok = np.zeros((size,), np.float32)
    ok[:len(flat)] = 1.0
    k, g, norms = cache_batch(model, norms, cfg.modules, cfg.shapes, jnp.asarray(batch.input_ids),
                              jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels),
                              jnp.asarray(rows), jnp.asarray(ok))
    for n in cfg.modules:
      keys[n].append(k[n])
      grads[n].append(g[n])
    valid.append(ok)
  # Drop the per-batch bucket padding: keep real rows only, then pad once to the chunked total.
  real = np.nonzero(np.concatenate(valid))[0]
  total, chunk = padded_rows(len(real), cfg.chunk)
  take = np.zeros((total,), np.int32)
  take[:len(real)] = real
  ok = np.zeros((total,), np.float32)
  ok[:len(real)] = 1.0
  take_j, ok_j = jnp.asarray(take), jnp.asarray(ok)

  def cat(parts):
    return jnp.concatenate(parts, axis=0)[take_j] * ok_j[:, None]

  cache = Cache({n: cat(keys[n]) for n in cfg.modules}, {n: cat(grads[n]) for n in cfg.modules}, ok_j)
  return cache, norms, chunk


# ---------------------------------------------------------------- 2. shifts from the cache

def stack_cache(cache: Cache, cfg: HypernetConfig) -> shifts_lib.Stacked:
  """The Cache's per-module rows stacked by run of modules sharing a hypernetwork."""
  return shifts_lib.Stacked(shifts_lib.stack_modules(cache.keys, cfg),
                            shifts_lib.stack_modules(cache.grads, cfg), cache.valid)


def shifts_from_cache(nets: dict, norms: dict, cache: Cache, cfg: HypernetConfig, chunk: int):
  """All modules' shifts from a Cache (differentiable end to end).

  Returns:
    (shifts {name: [d_k, d_v]}, raw value differences {name: [R, d_v]} (empty for MEND)).
  """
  solved = shifts_lib.solve_stacked(nets, norms, stack_cache(cache, cfg), cfg, chunk)
  diffs = {} if solved.diffs is None else shifts_lib.unstack_modules(solved.diffs, cfg)
  return shifts_lib.unstack_modules(solved.shifts, cfg), diffs


predict_shifts = jax.jit(shifts_from_cache, static_argnames=("cfg", "chunk"))


def predict(state: HypernetState, model: Model, cfg: HypernetConfig, batches: Sequence[EditBatch]):
  """Caches the edits and predicts shifts.

  Returns:
    (shifts {name: [d_k, d_v]}, raw value differences, cache, chunk, state with updated normalizers).
  """
  cache, norms, chunk = build_cache(model, state.norms, cfg, batches)
  shifts, diffs = predict_shifts(state.nets, norms, cache, cfg, chunk)
  return shifts, diffs, cache, chunk, state._replace(norms=norms)


# ---------------------------------------------------------------- 3-5. meta-training

@functools.partial(jax.jit, static_argnames=("kind", "low"))
def shift_loss_grad(model: Model, shifts: dict, input_ids, attention_mask, labels, kind: str, low: int):
  """Loss of one mini-batch of the edited model and its gradient with respect to the shifts.

  Args:
    kind: "ce" (token-mean CE on labels) or "kl" (KL(pre || post) on label positions).
    low: lowest edited layer (the stream below it is shared by pre and post).

  Returns:
    (loss, {name: dLoss/dS}).
  """
  h = hidden_before(model, low, input_ids, attention_mask)

  def loss_fn(s):
    edited = Model(add_to_kernels(model.params, s), model.config)
    post = forward_from(edited, low, h, attention_mask).logits
    if kind == "ce":
      return token_ce(post, labels)
    pre = lax.stop_gradient(forward_from(model, low, h, attention_mask).logits)
    return token_kl(pre, post, labels)

  return jax.value_and_grad(loss_fn)(shifts)


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


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def decoupled_grads(nets: dict, norms: dict, cache: Cache, shifts: dict, diffs: dict, dshifts: dict,
                    cfg: HypernetConfig, chunk: int) -> dict:
  """`meta.decoupled_grads_stacked` on per-module dicts (the Cholesky factors are recomputed)."""
  stack = functools.partial(shifts_lib.stack_modules, cfg=cfg)
  solved = shifts_lib.Solved(stack(shifts), None if cfg.method == "mend" else stack(diffs), None)
  return decoupled_grads_stacked(nets, norms, stack_cache(cache, cfg), solved, stack(dshifts), cfg,
                                 chunk)


def meta_gradients(state: HypernetState, cache: Cache, cfg: HypernetConfig, chunk: int, shifts: dict,
                   diffs: dict, dshifts: dict) -> dict:
  """Decoupled gradients of the hypernetwork params; HORSE/MEND leave lamda untrained."""
  grads = decoupled_grads(state.nets, state.norms, cache, shifts, diffs, dshifts, cfg, chunk)
  if cfg.method != "malmen":
    grads = {k: {**g, "lamda": jnp.zeros_like(g["lamda"])} for k, g in grads.items()}
  return grads


def train_step_reference(state: HypernetState, model: Model, cfg: HypernetConfig,
                         edits: Sequence[EditBatch], rephrase: Sequence[EditBatch],
                         loc: Sequence[EditBatch]):
  """One meta-training step computed stage by stage (cache per mini-batch, separate jits).

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
  if not all(np.isfinite(v) for v in metrics.values()):
    raise FloatingPointError(f"non-finite meta-training values {metrics}")
  return HypernetState(nets, state.norms, opt_state, state.step + 1), metrics
