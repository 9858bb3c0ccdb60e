"""From cached keys/value grads to weight shifts (steps 3-6 of HORSE/MALMEN; MEND's rank-one update).

  (k~, g~) = hypernet(normalize(concat(k, g)))           per token, in chunks of `chunk` rows
  d        = -lr[m] * (k . k~) * g~                      value differences D [R, d_v]
  HORSE:  D_l <- D_l - c * G_{l-1},  c = <D_l, D_{l-1}> / <D_{l-1}, D_{l-1}>   (spread: reference)
          D_l <- D_l - c * D_{l-1}                                          (spread: gram_schmidt)
  S        = (K^T K + e^lamda[m] I)^{-1} K^T D            refined Cholesky solve, S [d_k, d_v]
  MEND:   S = -lr[m] * K~^T G~                           (sum of rank-one updates, no solve)

S is in kernel layout [d_k, d_v] ([in, out]) and is added to the kernel as it is. In the spread,
D_{l-1} and G_{l-1} are constants for differentiation (`stop_gradient`), as in the reference backward.

Memory: the hypernetwork runs under `lax.map` over chunks of `chunk` rows, so at most one chunk of
[chunk, d_k + d_v] activations (x n_blocks, x rank) is alive at once; D is [R, d_v], K^T K is
[d_k, d_k] (485 MB at d_k = 11008), split by row over the mesh's devices with a mesh (see "the
ridge solve" below). Modules sharing a hypernetwork are stacked and solved by one `lax.scan`
(`solve_stacked`), so one module's K^T K / factor is alive at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsl
from jax.sharding import PartitionSpec as P

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


# ---------------------------------------------------------------- the ridge solve
#
# S = (K^T K + e^lamda I)^{-1} K^T D, and in the meta backward X = (K^T K + e^lamda I)^{-1} M.
#
# Accuracy. The system is ill-conditioned (condition 3e4-1e5 on the demo world at 1,000 edits), so a
# plain float32 Cholesky solve is off the float64 solution by up to 1.8e-4 relative, and by a
# different amount on every mesh (the gram is summed over the row shards in the mesh's order).
# Measured on the world's four down_proj at 1,000 edits (float64 NumPy solve of the same float32
# K, D as truth): Cholesky 1.8e-4 / 6.6e-5 / 3.5e-5 / 6.3e-5; with Jacobi (diagonal) scaling
# 1.9e-4 / 6.3e-5 / 3.3e-5 / 6.0e-5 (no gain: the error is the float32 gram's rounding, not the
# factorization's scaling); refined against the formed gram 2.0e-4 / 5.6e-5 (same reason); refined
# with the residual of the *operator* r = K^T (D - K X) - e^lamda X, which never forms the gram, in
# float32 at HIGHEST precision: 3.0e-6 / 1.7e-6 / 1.5e-6 / 1.6e-6. So the factor is only a
# preconditioner here: each refinement step multiplies the error by ~cond x eps (~1e-2), and the
# result is fixed by the operator residual, whose rounding is ~1e-6 of the result on any mesh
# (the cache's own mesh-to-mesh differences move the float64 solution by ~3e-6).
# `REFINE_STEPS` refinement steps follow the first solve.
#
# Distribution. With a mesh of n devices (both axes) dividing d_k, every [d_k, *] matrix of the
# solve is split by row over all devices (shard_map): the gram K^T K is reduce-scattered by a
# ring (each device adds its rows' contribution to one block of rows at a time and passes it on,
# so no device holds a whole [d_k, d_k] partial sum), the Cholesky factor is computed blocked,
# right-looking, on those row blocks (per column block of `nb` columns: the panel is gathered
# ([d_k, nb]), its diagonal block factored on every device, the panel solved and the trailing rows
# updated locally), and the triangular solves go block by block with one [nb, d_v] psum per block.
# The factor stays split by row (kept so for the meta backward). A replicated gram / factor is
# used only without a mesh, on one device, or when n does not divide d_k.
# The dual form (K K^T + e^lamda I)^{-1} does not pay here: the cached rows (edits x answer tokens)
# outnumber d_k (2,048 rows > 768 on the world at 1,000 edits; 24,576 > 14,336 for Llama-3-8B at
# 8,000 edits). CG on the distributed operator would need ~sqrt(cond) ~ 300 iterations of two
# [R, d_k] x [d_k, d_v] products each, far more than the factorization.

REFINE_STEPS = 2
AXES = ("data", "model")
BLOCK = 512


def _n_split(mesh, d_k: int) -> int:
  """Devices the solve's [d_k, *] matrices are split over by row (1: not split)."""
  if mesh is None:
    return 1
  n = mesh.devices.size
  return n if n > 1 and d_k % n == 0 else 1


def _block(rows: int) -> int:
  """Columns per step of the blocked factorization / solves: the largest divisor of a device's
  row count up to BLOCK (a column block's diagonal block then lies on one device)."""
  return max(b for b in range(1, min(rows, BLOCK) + 1) if rows % b == 0)


class _Rows:
  """Inside shard_map: this device's view of the row-split [d, *] matrices (n devices, m rows)."""

  def __init__(self, d: int, n: int, keys_split: bool):
    self.d, self.n, self.m = d, n, d // n
    self.p = lax.axis_index(AXES)
    self.keys_split = keys_split  # keys' rows split over the devices (else whole on each)

  def cols(self, k_loc, q):
    """Columns of device q's rows of the [d, *] matrices: K[:, q-th block]."""
    return lax.dynamic_slice_in_dim(k_loc, q * self.m, self.m, axis=1)

  def kt(self, k_loc, x_loc):
    """This device's rows of K^T X (X [R, *] split like the keys)."""
    if not self.keys_split:
      return jnp.matmul(self.cols(k_loc, self.p).T, x_loc, precision=HI)
    return lax.psum_scatter(jnp.matmul(k_loc.T, x_loc, precision=HI), AXES, scatter_dimension=0,
                            tiled=True)

  def gram(self, k_loc):
    """This device's rows of K^T K, reduce-scattered by a ring: the partial sum for device q's
    rows travels q+1, q+2, ..., q, each device adding its own keys' contribution."""
    if not self.keys_split:
      return jnp.matmul(self.cols(k_loc, self.p).T, k_loc, precision=HI)
    n, p = self.n, self.p
    part = lambda q: jnp.matmul(self.cols(k_loc, q % n).T, k_loc, precision=HI)
    perm = [(i, (i + 1) % n) for i in range(n)]
    step = lambda s, acc: lax.ppermute(acc, AXES, perm) + part(p - 1 - s)
    return lax.fori_loop(1, n, step, part(p - 1))

  def diag_block(self, x_loc, c0, nb):
    """(rows c0..c0+nb of x if this device holds them, whether it does)."""
    own = (c0 // self.m) == self.p
    start = jnp.clip(c0 - self.p * self.m, 0, self.m - nb)
    return lax.dynamic_slice_in_dim(x_loc, start, nb, axis=0), own, start

  def row_ids(self):
    return self.p * self.m + jnp.arange(self.m)

  def cholesky(self, a_loc):
    """Lower Cholesky factor of the row-split SPD matrix, row-split the same way."""
    d, nb = self.d, _block(self.m)
    rows_all, rows = jnp.arange(d), self.row_ids()

    def step(j, a):
      c0 = j * nb
      panel = lax.all_gather(lax.dynamic_slice_in_dim(a, c0, nb, axis=1), AXES, tiled=True)
      l_jj = jnp.linalg.cholesky(lax.dynamic_slice_in_dim(panel, c0, nb, axis=0))
      l_col = lax.linalg.triangular_solve(l_jj, panel, left_side=False, lower=True,
                                          transpose_a=True)
      l_col = jnp.where(rows_all[:, None] >= c0, l_col, 0.0)
      l_col = lax.dynamic_update_slice_in_dim(l_col, l_jj, c0, axis=0)
      a = lax.dynamic_update_slice_in_dim(a, lax.dynamic_slice_in_dim(l_col, self.p * self.m,
                                                                       self.m, axis=0), c0, axis=1)
      below = jnp.where(rows_all[:, None] >= c0 + nb, l_col, 0.0)
      below_loc = jnp.where(rows[:, None] >= c0 + nb,
                            lax.dynamic_slice_in_dim(l_col, self.p * self.m, self.m, axis=0), 0.0)
      return a - jnp.matmul(below_loc, below.T, precision=HI)

    return lax.fori_loop(0, d // nb, step, a_loc)

  def cho_solve(self, l_loc, b_loc):
    """(L L^T)^{-1} B with L and B split by row: forward substitution by column blocks (each
    block's solution broadcast by a psum), back substitution by dot products (one psum each)."""
    nb = _block(self.m)
    rows, eye = self.row_ids(), jnp.eye(nb, dtype=l_loc.dtype)

    def diag(c0):
      l_blk, own, start = self.diag_block(l_loc, c0, nb)
      return jnp.where(own, lax.dynamic_slice_in_dim(l_blk, c0, nb, axis=1), eye), own, start

    def forward(j, y):
      c0 = j * nb
      l_jj, own, start = diag(c0)
      b_j = lax.dynamic_slice_in_dim(y, start, nb, axis=0)
      y_j = lax.psum(jnp.where(own, lax.linalg.triangular_solve(l_jj, b_j, left_side=True,
                                                                lower=True), 0.0), AXES)
      y = jnp.where(own, lax.dynamic_update_slice_in_dim(y, y_j, start, axis=0), y)
      l_below = jnp.where(rows[:, None] >= c0 + nb, lax.dynamic_slice_in_dim(l_loc, c0, nb, axis=1),
                          0.0)
      return y - jnp.matmul(l_below, y_j, precision=HI)

    def backward(i, x):
      c0 = (self.d // nb - 1 - i) * nb
      l_jj, own, start = diag(c0)
      l_below = jnp.where(rows[:, None] >= c0 + nb, lax.dynamic_slice_in_dim(l_loc, c0, nb, axis=1),
                          0.0)
      done = lax.psum(jnp.matmul(l_below.T, x, precision=HI), AXES)
      y_j = lax.dynamic_slice_in_dim(x, start, nb, axis=0)
      x_j = lax.linalg.triangular_solve(l_jj, y_j - done, left_side=True, lower=True,
                                        transpose_a=True)
      return jnp.where(own, lax.dynamic_update_slice_in_dim(x, x_j, start, axis=0), x)

    y = lax.fori_loop(0, self.d // nb, forward, b_loc)
    return lax.fori_loop(0, self.d // nb, backward, y)


class _Whole:
  """The same operations on whole (unsplit) matrices."""

  def kt(self, k, x):
    return jnp.matmul(k.T, x, precision=HI)

  def gram(self, k):
    return jnp.matmul(k.T, k, precision=HI)

  def row_ids(self):
    return jnp.arange(self.d)

  def cholesky(self, a):
    return jsl.cho_factor(a, lower=True)[0]

  def cho_solve(self, l, b):
    return jsl.cho_solve((l, True), b)


def _ops(d: int, n: int, keys_split: bool):
  if n == 1:
    ops = _Whole()
    ops.d = d
    return ops
  return _Rows(d, n, keys_split)


def _gather_rows(ops, x_loc):
  return x_loc if isinstance(ops, _Whole) else lax.all_gather(x_loc, AXES, tiled=True)


def _factor_local(ops, k, lamda):
  a = ops.gram(k)
  a = a + jnp.exp(lamda) * (ops.row_ids()[:, None] == jnp.arange(a.shape[1])[None]).astype(a.dtype)
  return ops.cholesky(a)


def _refined_local(ops, l, k, lamda, diffs, rhs, refine: int = REFINE_STEPS):
  """X with (K^T K + e^lamda I) X = K^T diffs + rhs (either may be None), refined `refine` times
  with the operator residual (see the section comment)."""
  lam = jnp.exp(lamda)

  def residual(x):
    e = None if x is None else jnp.matmul(k, _gather_rows(ops, x), precision=HI)
    if diffs is not None:
      e = diffs if e is None else diffs - e
    elif e is not None:
      e = -e
    r = 0.0 if e is None else ops.kt(k, e)
    r = r if rhs is None else rhs + r
    return r if x is None else r - lam * x

  x = ops.cho_solve(l, residual(None))
  for _ in range(refine):
    x = x + ops.cho_solve(l, residual(x))
  return x


def _sharded(fn, mesh, d_k: int, n_rows: int, n_keys_like: int, n_row_split: int):
  """fn(ops, *args) under shard_map: the first `n_keys_like` args are [R, *] (keys, diffs), the next
  `n_row_split` are [d_k, *] split by row, the last one is the scalar lamda; returns a [d_k, *]
  split by row."""
  n = _n_split(mesh, d_k)
  keys_split = n > 1 and n_rows % n == 0
  if n == 1:
    return lambda *args: fn(_ops(d_k, 1, False), *args)
  row = P(AXES, None)
  key = row if keys_split else P()
  specs = (key,) * n_keys_like + (row,) * n_row_split + (P(),)
  return jax.shard_map(lambda *args: fn(_ops(d_k, n, keys_split), *args), mesh=mesh,
                       in_specs=specs, out_specs=row)


@exact
def ridge_factor(keys_RxK: jax.Array, lamda: jax.Array, mesh=None) -> jax.Array:
  """Lower Cholesky factor [d_k, d_k] of K^T K + e^lamda I: split by row over every device of
  `mesh` when their number divides d_k (gram reduce-scattered, blocked factorization), else whole.

  A constant for differentiation: the refined solves (`ridge_shift`, `ridge_resolve`) use it only
  as a preconditioner.
  """
  r, d = keys_RxK.shape
  fn = _sharded(lambda ops, k, lam: _factor_local(ops, k, lam), mesh, d, r, 1, 0)
  return lax.stop_gradient(fn(keys_RxK, lamda))


@exact
def ridge_resolve(factor_KxK, keys_RxK, rhs_KxV, lamda, mesh=None,
                  refine: int = REFINE_STEPS) -> jax.Array:
  """X = (K^T K + e^lamda I)^{-1} M (the meta backward's solve), `refine` times refined; split by
  row with a mesh."""
  r, d = keys_RxK.shape
  fn = _sharded(lambda ops, k, l, m, lam: _refined_local(ops, l, k, lam, None, m, refine), mesh, d,
                r, 1, 2)
  return fn(keys_RxK, factor_KxK, rhs_KxV, lamda)


# K X in the meta backward. X = A^{-1} M is accurate to ~1e-7 of its norm, but M (dLoss/dS) has
# components outside the row space of K that A^{-1} keeps (divided by e^lamda only) and K then
# annihilates: |K X| is ~1e-3 of |K| |X| on the world (16 edits, 32 rows < d_k = 768), so the float32
# product K X loses three digits (2e-4 relative against a float64 solve, and so memo vs recompute,
# 1x1 vs 2x4 differed by as much) whatever X's accuracy. Y = K X solves the dual system
# (K K^T + e^lamda I) Y = K M, so Y is refined with the dual residual r = K M - K (K^T Y) - e^lamda Y,
# whose correction (K K^T + e^lamda I)^{-1} r = (r - K A^{-1} K^T r) / e^lamda (Woodbury) reuses the
# primal factor; K^T r lies in K's row space, where A^{-1} keeps no large component.
# Measured on the world recipe's first step (float64 NumPy as truth): K X 4.8e-5 / 2.0e-4 -> ~1.6e-6.
# Only with fewer cached rows than d_k: K then has a null space the dual system does not see
# (eigenvalues sigma_i^2 + e^lamda over the R rows). With R >= d_k the dual system is the singular
# one (an R - d_k dimensional null space at e^lamda), its residual stalls the refinement at ~5e-5 on
# an ill-conditioned test system where the plain product is at 8e-6, so K X stays the plain product.


@exact
def ridge_resolve_rows(factor_KxK, keys_RxK, rhs_KxV, lamda, mesh=None):
  """(X, K X) with X = (K^T K + e^lamda I)^{-1} M: X refined as `ridge_resolve`; with fewer rows
  than d_k, K X then refined `REFINE_STEPS` times with the dual residual (see the comment above)."""
  lam = jnp.exp(lamda)
  x = ridge_resolve(factor_KxK, keys_RxK, rhs_KxV, lamda, mesh)
  y = jnp.matmul(keys_RxK, x, precision=HI)
  if keys_RxK.shape[0] >= keys_RxK.shape[1]:
    return x, y
  km = jnp.matmul(keys_RxK, rhs_KxV, precision=HI)
  for _ in range(REFINE_STEPS):
    r = km - jnp.matmul(keys_RxK, jnp.matmul(keys_RxK.T, y, precision=HI), precision=HI) - lam * y
    z = ridge_resolve(factor_KxK, keys_RxK, jnp.matmul(keys_RxK.T, r, precision=HI), lamda, mesh,
                      refine=0)
    y = y + (r - jnp.matmul(keys_RxK, z, precision=HI)) / lam
  return x, y


@exact
def _shift(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK):
  r, d = keys_RxK.shape
  fn = _sharded(lambda ops, k, dd, l, lam: _refined_local(ops, l, k, lam, dd, None), mesh, d, r, 2,
                1)
  return fn(keys_RxK, diffs_RxV, factor_KxK, lamda)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ridge_shift(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK):
  return _shift(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK)


def _ridge_shift_fwd(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK):
  s = _shift(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK)
  return s, (keys_RxK, diffs_RxV, lamda, factor_KxK, s)


@exact
def _ridge_shift_bwd(mesh, res, m_KxV):
  """With A = K^T K + e^lamda I, S = A^{-1} K^T D and X = A^{-1} M (refined, same factor):
  dD = K X, dK = D X^T - K (S X^T + X S^T), dlamda = -e^lamda <X, S>; the factor gets none."""
  k, dd, lamda, factor, s = res
  x, kx = ridge_resolve_rows(factor, k, m_KxV, lamda, mesh)
  ks = jnp.matmul(k, s, precision=HI)
  dk = (jnp.matmul(dd, x.T, precision=HI) - jnp.matmul(ks, x.T, precision=HI)
        - jnp.matmul(kx, s.T, precision=HI))
  return dk, kx, -jnp.exp(lamda) * jnp.sum(x * s), jnp.zeros_like(factor)


_ridge_shift.defvjp(_ridge_shift_fwd, _ridge_shift_bwd)


@exact
def ridge_shift(keys_RxK, diffs_RxV, lamda, factor_KxK, mesh=None) -> jax.Array:
  """S = (K^T K + e^lamda I)^{-1} K^T D [d_k, d_v] given `ridge_factor`'s factor: one solve and
  `REFINE_STEPS` refinements (split by row with a mesh). Differentiable in K, D and lamda (a
  custom vjp: one more refined solve)."""
  return _ridge_shift(mesh, keys_RxK, diffs_RxV, lamda, factor_KxK)


@exact
def ridge_solve(keys_RxK: jax.Array, diffs_RxV: jax.Array, lamda: jax.Array, mesh=None) -> jax.Array:
  """S = (K^T K + e^lamda I)^{-1} K^T D [d_k, d_v]: `ridge_factor` then `ridge_shift`."""
  return ridge_shift(keys_RxK, diffs_RxV, lamda, ridge_factor(keys_RxK, lamda, mesh), mesh)


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
    factors: per run [M, d_k, d_k] lower Cholesky factors, split by row over the mesh's devices
      (`ridge_factor`; None for MEND).
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


@exact
def solve_stacked(nets: dict, norms: dict, stacked: Stacked, cfg: HypernetConfig, chunk: int,
                  mesh=None) -> Solved:
  """All modules' shifts, one `lax.scan` over the modules of each run (differentiable end to end).

  HORSE's spread reads the previous module's raw D and value grads, carried through the scan (and
  from one run to the next). With a `mesh` the solve's matrices are split by row over its devices
  (see `ridge_factor`, `ridge_shift`).

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
      s = ridge_shift(k, d_used, net["lamda"][m], factor, mesh)
      return ((d, g) if horse else ()), (s, d, factor)

    prev, (s_run, d_run, f_run) = lax.scan(body, prev, (k_run, g_run, m_run, spread_run))
    shifts.append(s_run)
    diffs.append(d_run)
    factors.append(f_run)
  if cfg.method == "mend":
    return Solved(shifts, None, None)
  return Solved(shifts, diffs, factors)
