"""The ridge solve S = (K^T K + e^lamda I)^{-1} K^T D (`shifts.ridge_solve`) and its gradient against
NumPy float64 written from the formula, on one device and split over meshes of the 8 forced CPU
devices (ring reduce-scattered gram, blocked Cholesky split by row, refined solves)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.editors.hypernet import shifts
from horse_jax.models import make_mesh


def rel(a, b):
  return np.linalg.norm(np.float64(a) - b) / np.linalg.norm(b)


def system(seed=0, rows=192, d_k=64, d_v=24):
  """Ill-conditioned float32 keys (column scales e^N(0,1), eight near-collinear columns) and diffs."""
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(rows, d_k)) * np.exp(rng.normal(size=d_k))
  k[:, :8] = k[:, 8:16] + 1e-3 * rng.normal(size=(rows, 8))
  k, d = np.float32(k), np.float32(rng.normal(size=(rows, d_v)))
  return k, d, np.float32(-1.0), rng.normal(size=(d_k, d_v))


def np_solve(k, d, lam, w):
  """(S, dLoss/dK, dLoss/dD, dLoss/dlamda) of Loss = <W, S> in float64, from the formula:
  A = K^T K + e^lamda I, S = A^{-1} K^T D, X = A^{-1} W; dK = D X^T - K (S X^T + X S^T),
  dD = K X, dlamda = -e^lamda <X, S>."""
  k, d, lam = np.float64(k), np.float64(d), np.float64(lam)
  a = k.T @ k + np.exp(lam) * np.eye(k.shape[1])
  s = np.linalg.solve(a, k.T @ d)
  x = np.linalg.solve(a, w)
  return s, d @ x.T - k @ (s @ x.T + x @ s.T), k @ x, -np.exp(lam) * np.sum(x * s)


@pytest.mark.parametrize("mesh_shape", [None, (1, 8), (2, 4), (8, 1)])
def test_solve_and_gradient_match_float64(mesh_shape):
  k, d, lam, w = system()
  mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
  want = np_solve(k, d, lam, w)
  assert np.linalg.cond(np.float64(k).T @ k + np.exp(lam) * np.eye(64)) > 1e4

  def loss(kk, dd, ll):
    return jnp.sum(jnp.float32(w) * shifts.ridge_solve(kk, dd, ll, mesh))

  s = jax.jit(lambda kk, dd, ll: shifts.ridge_solve(kk, dd, ll, mesh))(k, d, lam)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(k, d, lam)
  # A plain float32 Cholesky solve of this system is off by ~6e-5; the refined one by ~2e-5.
  assert rel(s, want[0]) < 4e-5, rel(s, want[0])
  for got, ref, tol in zip(grads, want[1:], (1e-5, 4e-5, 2e-3)):
    assert rel(got, ref) < tol, (rel(got, ref), tol)
  if mesh is not None:  # the factor is split by row over all the devices
    fac = jax.jit(lambda kk, ll: shifts.ridge_factor(kk, ll, mesh))(k, lam)
    assert fac.sharding.shard_shape(fac.shape) == (64 // 8, 64)
    chol = np.linalg.cholesky(np.float64(k).T @ k + np.exp(np.float64(lam)) * np.eye(64))
    assert rel(fac, chol) < 1e-4


def test_meshes_agree():
  """Different reduction orders (1x1, 1x8, 2x4, and rows not divisible by the devices: keys whole on
  each device) give the same shift to well within 1e-4."""
  k, d, lam, _ = system(seed=1, rows=200)  # 200 rows: not a multiple of 8
  out = [np.float64(jax.jit(lambda kk, dd, ll, m=m: shifts.ridge_solve(kk, dd, ll, m))(k, d, lam))
         for m in (None, make_mesh(1, 8), make_mesh(2, 4))]
  for s in out[1:]:
    assert rel(s, out[0]) < 5e-5


def test_resolve_matches_float64():
  """The meta backward's solve X = A^{-1} M from a stored (row-split) factor."""
  k, _, lam, w = system(seed=2)
  mesh = make_mesh(2, 4)
  fac = shifts.ridge_factor(k, lam, mesh)
  x = jax.jit(lambda f, kk, m, ll: shifts.ridge_resolve(f, kk, m, ll, mesh))(fac, k, np.float32(w),
                                                                              lam)
  a = np.float64(k).T @ k + np.exp(np.float64(lam)) * np.eye(64)
  assert rel(x, np.linalg.solve(a, w)) < 4e-5


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_resolve_rows_matches_float64_where_the_product_cancels(mesh_shape):
  """K X of the meta backward (X = A^{-1} M) with fewer rows than d_k and M mostly outside K's row
  space: A^{-1} keeps that part (divided by e^lamda), K annihilates it, so the float32 product K X
  of even an exact-to-rounding X cancels to a few digits; the dual-refined K X does not."""
  rng = np.random.default_rng(3)
  k = np.float32(rng.normal(size=(32, 128)) * 3.0)
  w = rng.normal(size=(128, 16))
  lam = np.float32(-2.0)
  mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
  a = np.float64(k).T @ k + np.exp(np.float64(lam)) * np.eye(128)
  want = np.float64(k) @ np.linalg.solve(a, w)
  fac = shifts.ridge_factor(k, lam, mesh)
  x, kx = jax.jit(lambda f, kk, m, ll: shifts.ridge_resolve_rows(f, kk, m, ll, mesh))(
      fac, k, np.float32(w), lam)
  plain = np.float64(k) @ np.float64(x)  # even in float64, the float32 X's rounding shows
  assert rel(x, np.linalg.solve(a, w)) < 1e-5
  assert rel(plain, want) > 1e-5, rel(plain, want)  # the case is a hard one
  assert rel(kx, want) < 1e-5, rel(kx, want)
