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
[d_k, d_k] (485 MB at d_k = 11008).
"""

from __future__ import annotations

import functools
import os

# XLA's CPU Cholesky / triangular solves call LAPACK from the OpenBLAS that scipy bundles, whose own
# worker threads spin against XLA's thread pool: on a 2-core machine a 768 x 768 factorization then
# stalls for ~0.5 s instead of 4 ms. One OpenBLAS thread removes the stalls; the variable is read
# when OpenBLAS loads (at the first LAPACK call, after this import), and a value set by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsl
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.network import apply_blocks

HI = lax.Precision.HIGHEST


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


def spread_one(d_RxV: jax.Array, prev_d_RxV: jax.Array, prev_g_RxV: jax.Array, variant: str):
  """HORSE spread of one module's D given the previous module's raw D and raw value grads."""
  prev_d = lax.stop_gradient(prev_d_RxV)
  sub = prev_d if variant == "gram_schmidt" else lax.stop_gradient(prev_g_RxV)
  c = jnp.sum(d_RxV * prev_d) / jnp.sum(prev_d * prev_d)
  return d_RxV - c * sub


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


def ridge_solve(keys_RxK: jax.Array, diffs_RxV: jax.Array, lamda: jax.Array, mesh=None) -> jax.Array:
  """S = (K^T K + e^lamda I)^{-1} K^T D via Cholesky [d_k, d_v] (columns over `model` with a mesh)."""
  factor = ridge_factor(keys_RxK, lamda, mesh)
  return solve_cols(factor, jnp.matmul(keys_RxK.T, diffs_RxV, precision=HI), mesh)


def _constrain(x, mesh, spec):
  if mesh is None:
    return x
  return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shifts_from_cache(nets: dict, norms: dict, cache, cfg: HypernetConfig, chunk: int, mesh=None):
  """All modules' shifts (differentiable end to end; `predict_shifts` is its jitted form).

  Modules are solved one after another; with a `mesh` the solve's right-hand side and the shift
  are split by column over `model` (see `solve_cols`).

  Returns:
    (shifts {name: [d_k, d_v]}, raw value differences {name: [R, d_v]} (empty for MEND)).
  """
  shifts, diffs, _ = shifts_and_factors(nets, norms, cache, cfg, chunk, mesh)
  return shifts, diffs


def shifts_and_factors(nets: dict, norms: dict, cache, cfg: HypernetConfig, chunk: int, mesh=None):
  """`shifts_from_cache` plus each module's Cholesky factor (reused by the meta backward).

  Returns:
    (shifts, raw value differences, {name: (L, True)} (empty for MEND)).
  """
  shifts, diffs, factors = {}, {}, {}
  prev = None
  for l, (name, skey, m) in enumerate(zip(cfg.modules, cfg.shape_keys, cfg.module_index)):
    net, norm = nets[skey], norms[skey]
    k, g = cache.keys[name], cache.grads[name]
    if cfg.method == "mend":
      shifts[name] = rank_one_shift(net, norm, m, k, g, cache.valid, chunk)
      continue
    d = value_diffs(net, norm, m, k, g, chunk)
    diffs[name] = d
    d_used = d
    if cfg.method == "horse" and l > 0:
      d_used = spread_one(d, diffs[prev], cache.grads[prev], cfg.spread)
    factors[name] = ridge_factor(k, net["lamda"][m], mesh)
    shifts[name] = solve_cols(factors[name], jnp.matmul(k.T, d_used, precision=HI), mesh)
    prev = name
  return shifts, diffs, factors


predict_shifts = jax.jit(shifts_from_cache, static_argnames=("cfg", "chunk", "mesh"))
