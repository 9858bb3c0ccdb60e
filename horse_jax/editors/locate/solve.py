"""The closed-form updates of ROME, MEMIT and AlphaEdit (pure jnp, float32, kernel layout).

Kernels are [d_in, d_out] (`x @ kernel`); keys k live in d_in, values and residuals in d_out.

  ROME       u = C^-1 k_mean / |C^-1 k_mean| (or k_mean / |k_mean| without C)
             v = (z - W k_0) / (k_0 . u)              kernel += u v^T  (so the new W k_0 = z)
  MEMIT      R = (Z - Z_cur) / (layers left, this one included)
             A = (lambda C + K^T K)^-1 K^T  ... as `solve(lambda C + K K^T, K)` with K [d_in, n]
             kernel += A R                      (the reference solves in float64; here float32)
  AlphaEdit  P = U U^T over eigenvectors of C with eigenvalue < threshold
             kernel += solve(P (K K^T + cache) + L2 I, P K R)      and afterwards cache += K K^T

The reference's MEMIT solves in float64 on the GPU; this solves in float32 with HIGHEST matmul
precision (the system is symmetric positive definite, dominated by lambda C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def rome_left(key_mean, cov=None):
  """u: C^-1 k (solved, not inverted) normalised to unit length; k itself when `cov` is None.

  Args:
    key_mean: [d_in] the key averaged over the context templates.
    cov: [d_in, d_in] C, or None (`mom2_adjustment: false`).
  """
  u = key_mean if cov is None else jnp.linalg.solve(cov, key_mean)
  return u / jnp.linalg.norm(u)


def rome_right(target, cur_output, key0, left):
  """v = (z - W k_0) / (k_0 . u), with z the optimised target and W k_0 the module's output."""
  return (target - cur_output) / jnp.dot(key0, left, precision=_HI)


def rome_shift(left, right):
  """The rank-one kernel shift u v^T [d_in, d_out]."""
  return jnp.outer(left, right)


def spread(targets, current, layers_left: int):
  """MEMIT's residual share of one layer: (z - z_cur) / layers_left, per request [n, d]."""
  return (targets - current) / layers_left


def memit_shift(keys, resid, cov, lam):
  """MEMIT's kernel shift [d_in, d_out].

  Args:
    keys: [n, d_in] the requests' keys at this layer.
    resid: [n, d_out] their residual shares (`spread`).
    cov: [d_in, d_in] C.
    lam: `mom2_update_weight`.
  """
  kt = keys.T
  adj = jnp.linalg.solve(lam * cov + jnp.matmul(kt, keys, precision=_HI), kt)  # [d_in, n]
  return jnp.matmul(adj, resid, precision=_HI)


def null_space_projector(cov, threshold):
  """P = U U^T over the eigenvectors of C (symmetric PSD, so its SVD) with eigenvalue < threshold,
  and how many there are (all of them: P is the identity)."""
  values, vectors = jnp.linalg.eigh(cov)
  keep = (values < threshold).astype(cov.dtype)
  return jnp.matmul(vectors * keep[None, :], vectors.T, precision=_HI), jnp.sum(keep).astype(jnp.int32)


def alphaedit_shift(keys, resid, projector, cache, l2):
  """AlphaEdit's kernel shift [d_in, d_out]: solve(P (K K^T + cache) + L2 I, P K R).

  Args:
    keys: [n, d_in]; resid: [n, d_out]; projector: [d_in, d_in] P; cache: [d_in, d_in] the sum of
    K K^T over earlier edits; l2: the ridge.
  """
  kt = keys.T
  d = kt.shape[0]
  lhs = jnp.matmul(projector, jnp.matmul(kt, keys, precision=_HI) + cache, precision=_HI)
  rhs = jnp.matmul(projector, jnp.matmul(kt, resid, precision=_HI), precision=_HI)
  return jnp.linalg.solve(lhs + l2 * jnp.eye(d, dtype=lhs.dtype), rhs)


def cache_update(cache, keys):
  """cache + K K^T (keys [n, d_in])."""
  return cache + jnp.matmul(keys.T, keys, precision=_HI)
