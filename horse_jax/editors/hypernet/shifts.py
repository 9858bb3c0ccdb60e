"""From cached keys/value grads to weight shifts (steps 3-6 of HORSE/MALMEN; MEND's rank-one update).

  (k~, g~) = hypernet(normalize(concat(k, g)))           per token, in chunks of `chunk` rows
  d        = -lr[m] * (k . k~) * g~                      value differences D [R, d_v]
  HORSE:  D_l <- D_l - c * G_{l-1},  c = <D_l, D_{l-1}> / <D_{l-1}, D_{l-1}>   (spread: reference)
          D_l <- D_l - c * D_{l-1}                                          (spread: gram_schmidt)
  S        = (K^T K + e^lamda[m] I)^{-1} K^T D            Cholesky solve in float32, S [d_k, d_v]
  MEND:   S = -lr[m] * K~^T G~                           (sum of rank-one updates, no solve)

S is in kernel layout [d_k, d_v] ([in, out]) and is added to the kernel as it is. In the spread,
D_{l-1} and G_{l-1} are constants for differentiation (`stop_gradient`), as in the reference backward.

Memory: the hypernetwork runs under `lax.map` over chunks of `chunk` rows, so at most one chunk of
[chunk, d_k + d_v] activations (x n_blocks, x rank) is alive at once; D is [R, d_v], K^T K is
[d_k, d_k] (485 MB at d_k = 11008). Modules sharing a hypernetwork are stacked and solved by one
`lax.scan` (`solve_stacked`), so one module's K^T K / factor is alive at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsl
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.network import apply_blocks
from horse_jax.editors.precision import HIGHEST as HI, exact


def pseudo(net: dict, norm: normalizer.NormState, m: int, keys_CxK: jax.Array, grads_CxV: jax.Array):
  """Pseudo-keys and pseudo-grads (normalized space) of one chunk."""
  dk = keys_CxK.shape[-1]
  h = normalizer.normalize(norm, jnp.concatenate([keys_CxK, grads_CxV], axis=-1))
  h = apply_blocks(net["blocks"], h, m)
  return h[:, :dk], h[:, dk:]


def chunk_diffs(net: dict, norm: normalizer.NormState, m: int, keys_CxK, grads_CxV) -> jax.Array:
  """Value differences of one chunk: -lr[m] * (k . k~) * g~ [C, d_v]."""
  kt, gt = pseudo(net, norm, m, keys_CxK, grads_CxV)
  coef_C = -net["lr"][m] * jnp.sum(keys_CxK * kt, axis=-1)
  return coef_C[:, None] * gt


def chunk_rank_one(net: dict, norm: normalizer.NormState, m: int, keys_CxK, grads_CxV, valid_C):
  """MEND: this chunk's part of -lr[m] * K~^T G~ [d_k, d_v] (padding rows excluded)."""
  kt, gt = pseudo(net, norm, m, keys_CxK, grads_CxV)
  kt = kt * valid_C[:, None]
  return -net["lr"][m] * jnp.matmul(kt.T, gt, precision=HI)


def _chunks(x_RxD: jax.Array, chunk: int) -> jax.Array:
  """[R, ...] -> [R / chunk, chunk, ...], chunk i holding rows i, i + n, i + 2n, ... (n = R / chunk).

  Strided rather than contiguous so that rows split over the `data` mesh axis stay split inside
  every chunk (each device works on its own rows of each chunk); row-wise maps and sums over
  chunks do not depend on which rows share a chunk.
  """
  n = x_RxD.shape[0] // chunk
  return jnp.swapaxes(x_RxD.reshape(chunk, n, *x_RxD.shape[1:]), 0, 1)


def _unchunk(x_NxCxD: jax.Array) -> jax.Array:
  """Inverse of `_chunks`."""
  return jnp.swapaxes(x_NxCxD, 0, 1).reshape(-1, *x_NxCxD.shape[2:])


def value_diffs(net, norm, m, keys_RxK, grads_RxV, chunk: int) -> jax.Array:
  """D [R, d_v] computed chunk by chunk with `lax.map` (R must be a multiple of `chunk`)."""
  d_cxv = lax.map(lambda kg: chunk_diffs(net, norm, m, *kg), (_chunks(keys_RxK, chunk),
                                                              _chunks(grads_RxV, chunk)))
  return _unchunk(d_cxv)


def rank_one_shift(net, norm, m, keys_RxK, grads_RxV, valid_R, chunk: int) -> jax.Array:
  """MEND shift [d_k, d_v], summed over chunks with `lax.scan`."""
  def body(acc, xs):
    return acc + chunk_rank_one(net, norm, m, *xs), None
  init = jnp.zeros((keys_RxK.shape[1], grads_RxV.shape[1]), jnp.float32)
  out, _ = lax.scan(body, init, (_chunks(keys_RxK, chunk), _chunks(grads_RxV, chunk),
                                 _chunks(valid_R, chunk)))
  return out


def spread_one(d_RxV: jax.Array, prev_d_RxV: jax.Array, prev_g_RxV: jax.Array, variant: str,
               has_prev=True):
  """HORSE spread of one module's D given the previous module's raw D and raw value grads.

  `has_prev` (a traced bool inside a scan over modules) is False for the first module, whose
  `prev_*` are zeros: c is then 0 / 1 = 0 and D comes back unchanged, without a 0 / 0.
  """
  prev_d = lax.stop_gradient(prev_d_RxV)
  sub = prev_d if variant == "gram_schmidt" else lax.stop_gradient(prev_g_RxV)
  c = jnp.sum(d_RxV * prev_d) / jnp.where(has_prev, jnp.sum(prev_d * prev_d), 1.0)
  return d_RxV - c * sub


@exact  # the solves' products are float32 (horse_jax.editors.precision)
def ridge_matrix(keys_RxK: jax.Array, lamda: jax.Array) -> jax.Array:
  """K^T K + e^lamda I [d_k, d_k] (float32)."""
  gram = jnp.matmul(keys_RxK.T, keys_RxK, precision=HI)
  return gram + jnp.exp(lamda) * jnp.eye(gram.shape[0], dtype=jnp.float32)


def ridge_factor(keys_RxK: jax.Array, lamda: jax.Array, mesh=None):
  """Lower Cholesky factor of K^T K + e^lamda I, replicated (with rows of K split over `data` the
  gram is a sum of per-shard grams: XLA all-reduces it)."""
  gram = _constrain(ridge_matrix(keys_RxK, lamda), mesh, P())
  return jsl.cho_factor(gram, lower=True)


def cols_spec(mesh, n_cols: int):
  """P(None, model) for a [d, n_cols] matrix split by column, when `model` divides n_cols."""
  if mesh is None or n_cols % mesh.shape["model"]:
    return None
  return P(None, "model")


def solve_cols(factor, rhs_KxV: jax.Array, mesh=None) -> jax.Array:
  """(L L^T)^{-1} B with B's columns split over `model`: each device solves its own columns."""
  spec = cols_spec(mesh, rhs_KxV.shape[1])
  if spec is None:
    return jsl.cho_solve(factor, rhs_KxV)
  rhs = _constrain(rhs_KxV, mesh, spec)
  chol = _constrain(factor[0], mesh, P())
  fn = jax.shard_map(lambda c, b: jsl.cho_solve((c, True), b), mesh=mesh, in_specs=(P(), spec),
                     out_specs=spec)
  return fn(chol, rhs)


@exact
def ridge_solve(keys_RxK: jax.Array, diffs_RxV: jax.Array, lamda: jax.Array, mesh=None) -> jax.Array:
  """S = (K^T K + e^lamda I)^{-1} K^T D via Cholesky [d_k, d_v] (columns over `model` with a mesh)."""
  factor = ridge_factor(keys_RxK, lamda, mesh)
  return solve_cols(factor, jnp.matmul(keys_RxK.T, diffs_RxV, precision=HI), mesh)


def _constrain(x, mesh, spec):
  if mesh is None:
    return x
  return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------- modules stacked, one scan per run
#
# Consecutive modules that share a hypernetwork (one shape key; usually every edited module) are
# stacked on a leading module axis and solved by one `lax.scan`, in the forward and in the meta
# backward: only one module's [d_k, d_k] ridge matrix / Cholesky factor and one module's chunked
# hypernetwork temporaries are alive at a time (with a Python loop over modules XLA was free to
# schedule all modules' grams together: 6 x 784 MiB at Llama-3-8B scale).


def module_runs(cfg: HypernetConfig) -> tuple[tuple[int, ...], ...]:
  """Module indices grouped into runs of consecutive modules with the same shape key (config order)."""
  runs: list[list[int]] = []
  for i, skey in enumerate(cfg.shape_keys):
    if runs and cfg.shape_keys[runs[-1][-1]] == skey:
      runs[-1].append(i)
    else:
      runs.append([i])
  return tuple(tuple(r) for r in runs)


class Stacked(NamedTuple):
  """A cache with each run's modules stacked (see `module_runs`).

  Attributes:
    keys: per run [M, R, d_k] float32.
    grads: per run [M, R, d_v] float32.
    valid: [R] float32, 1 on real rows.
  """

  keys: list
  grads: list
  valid: jax.Array


class Solved(NamedTuple):
  """What the meta backward reuses from the forward, per run.

  Attributes:
    shifts: per run [M, d_k, d_v].
    diffs: per run [M, R, d_v] raw value differences (None for MEND).
    factors: per run [M, d_k, d_k] lower Cholesky factors, rows split over `model` with a mesh
      (None for MEND).
  """

  shifts: list
  diffs: list
  factors: list


def stack_modules(per_module: dict, cfg: HypernetConfig) -> list:
  """{name: array} -> per run, the run's arrays stacked on a new leading axis."""
  return [jnp.stack([per_module[cfg.modules[i]] for i in run]) for run in module_runs(cfg)]


def unstack_modules(per_run: list, cfg: HypernetConfig) -> dict:
  """Inverse of `stack_modules`."""
  out = {}
  for run, x in zip(module_runs(cfg), per_run):
    for j, i in enumerate(run):
      out[cfg.modules[i]] = x[j]
  return out


def run_inputs(cfg: HypernetConfig, run: tuple[int, ...]):
  """([M] int32 module index m into its net's per-module params, [M] bool: spread from the previous
  module) of one run."""
  m = jnp.asarray([cfg.module_index[i] for i in run], jnp.int32)
  spread = jnp.asarray([cfg.method == "horse" and i > 0 for i in run])
  return m, spread


def _factor_spec(mesh, d_k: int):
  """Stored factors: rows split over `model` when it divides them (gathered again in the backward)."""
  if mesh is None or d_k % mesh.shape["model"]:
    return None
  return P("model", None)


def store_factor(factor_KxK: jax.Array, mesh=None) -> jax.Array:
  """A factor as the forward keeps it for the backward (split by row over `model`)."""
  spec = _factor_spec(mesh, factor_KxK.shape[0])
  return factor_KxK if spec is None else _constrain(factor_KxK, mesh, spec)


@exact
def solve_stacked(nets: dict, norms: dict, stacked: Stacked, cfg: HypernetConfig, chunk: int,
                  mesh=None) -> Solved:
  """All modules' shifts, one `lax.scan` over the modules of each run (differentiable end to end).

  HORSE's spread reads the previous module's raw D and value grads, carried through the scan (and
  from one run to the next). With a `mesh` the solve's right-hand side and the shift are split by
  column over `model` (see `solve_cols`).

  Returns:
    Solved (shifts, raw value differences and Cholesky factors per run).
  """
  shifts, diffs, factors = [], [], []
  prev = None
  for run, k_run, g_run in zip(module_runs(cfg), stacked.keys, stacked.grads):
    skey = cfg.shape_keys[run[0]]
    net, norm = nets[skey], norms[skey]
    m_run, spread_run = run_inputs(cfg, run)
    if cfg.method == "mend":
      def mend_body(carry, xs, net=net, norm=norm):
        k, g, m = xs
        return carry, rank_one_shift(net, norm, m, k, g, stacked.valid, chunk)
      _, s_run = lax.scan(mend_body, (), (k_run, g_run, m_run))
      shifts.append(s_run)
      continue
    horse = cfg.method == "horse"
    if prev is None:  # HORSE carries the previous module's (D, G); MALMEN carries nothing
      prev = (jnp.zeros_like(g_run[0]), jnp.zeros_like(g_run[0])) if horse else ()

    def body(carry, xs, net=net, norm=norm, horse=horse):
      k, g, m, has_prev = xs
      d = value_diffs(net, norm, m, k, g, chunk)
      d_used = spread_one(d, *carry, cfg.spread, has_prev) if horse else d
      factor = ridge_factor(k, net["lamda"][m], mesh)
      s = solve_cols(factor, jnp.matmul(k.T, d_used, precision=HI), mesh)
      return ((d, g) if horse else ()), (s, d, store_factor(factor[0], mesh))

    prev, (s_run, d_run, f_run) = lax.scan(body, prev, (k_run, g_run, m_run, spread_run))
    shifts.append(s_run)
    diffs.append(d_run)
    factors.append(f_run)
  if cfg.method == "mend":
    return Solved(shifts, None, None)
  return Solved(shifts, diffs, factors)
