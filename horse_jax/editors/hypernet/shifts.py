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

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsl

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
  return x_RxD.reshape(x_RxD.shape[0] // chunk, chunk, *x_RxD.shape[1:])


def value_diffs(net, norm, m, keys_RxK, grads_RxV, chunk: int) -> jax.Array:
  """D [R, d_v] computed chunk by chunk with `lax.map` (R must be a multiple of `chunk`)."""
  d_cxv = lax.map(lambda kg: chunk_diffs(net, norm, m, *kg), (_chunks(keys_RxK, chunk),
                                                              _chunks(grads_RxV, chunk)))
  return d_cxv.reshape(keys_RxK.shape[0], -1)


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


def ridge_solve(keys_RxK: jax.Array, diffs_RxV: jax.Array, lamda: jax.Array) -> jax.Array:
  """S = (K^T K + e^lamda I)^{-1} K^T D via Cholesky [d_k, d_v]."""
  factor = jsl.cho_factor(ridge_matrix(keys_RxK, lamda), lower=True)
  return jsl.cho_solve(factor, jnp.matmul(keys_RxK.T, diffs_RxV, precision=HI))


def shifts_from_cache(nets: dict, norms: dict, cache, cfg: HypernetConfig, chunk: int):
  """All modules' shifts (differentiable end to end; `predict_shifts` is its jitted form).

  Returns:
    (shifts {name: [d_k, d_v]}, raw value differences {name: [R, d_v]} (empty for MEND)).
  """
  shifts, diffs = {}, {}
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
    shifts[name] = ridge_solve(k, d_used, net["lamda"][m])
    prev = name
  return shifts, diffs


predict_shifts = jax.jit(shifts_from_cache, static_argnames=("cfg", "chunk"))
