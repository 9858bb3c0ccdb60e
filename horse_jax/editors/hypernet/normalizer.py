"""Running mean/std of the hypernetwork inputs concat(key, value_grad), exactly as the reference keeps it.

  update with X (m rows):  n' = n + m;  delta = mean(X) - mean;  mean += m * delta / n'
                           var += m * var_unbiased(X) + n * m * delta^2 / n'
  std = sqrt(var / (n' - 1 + eps));   apply: (x - mean) / (std + eps),  eps = float32 machine eps.

(`var` is a running sum of squares, not a variance; `m * var_unbiased` rather than `(m - 1) * ...` is
the reference's formula and is kept so results compare.) Rows can be masked: padded rows of a cache
carry weight 0 and do not count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.editors.precision import HIGHEST, exact

EPS = float(np.finfo(np.float32).eps)


class NormState(NamedTuple):
  """Running statistics over rows of width W (float32)."""

  n: jax.Array  # [] number of rows seen
  mean: jax.Array  # [W]
  var: jax.Array  # [W] running sum of squares (reference naming)


def init(width: int) -> NormState:
  """Empty statistics (n = 0, mean = 0, var = 0)."""
  return NormState(jnp.zeros((), jnp.float32), jnp.zeros((width,), jnp.float32),
                   jnp.zeros((width,), jnp.float32))


@exact  # statistics: float32 products (horse_jax.editors.precision)
def update(state: NormState, rows_RxW: jax.Array, valid_R: jax.Array | None = None) -> NormState:
  """Folds the valid rows of `rows_RxW` into the statistics (the reference `update`).

  Args:
    state: current statistics.
    rows_RxW: new rows.
    valid_R: 1 for rows that count, 0 for padding; default all rows.

  Returns:
    The updated statistics; unchanged when no row is valid.
  """
  x = rows_RxW.astype(jnp.float32)
  w_R = jnp.ones(x.shape[:1], jnp.float32) if valid_R is None else valid_R.astype(jnp.float32)
  m = jnp.sum(w_R)
  batch_mean = jnp.sum(w_R[:, None] * x, axis=0) / jnp.maximum(m, 1.0)
  # torch.var (unbiased); a single row has no spread (torch would give NaN).
  batch_var = jnp.sum(w_R[:, None] * jnp.square(x - batch_mean[None, :]), axis=0) / jnp.maximum(m - 1.0, 1.0)
  return merge(state, m, batch_mean, batch_var)


def merge(state: NormState, m: jax.Array, batch_mean: jax.Array, batch_var: jax.Array) -> NormState:
  """Folds one batch given its row count, mean and unbiased variance (the reference formula)."""
  total = state.n + m
  safe_total = jnp.maximum(total, 1.0)
  delta = batch_mean - state.mean
  mean = state.mean + m * delta / safe_total
  var = state.var + m * batch_var + state.n * m * jnp.square(delta) / safe_total
  keep = m > 0
  return NormState(jnp.where(keep, total, state.n), jnp.where(keep, mean, state.mean),
                   jnp.where(keep, var, state.var))


@exact
def group_stats(rows_RxW: jax.Array, valid_R: jax.Array, group_R: jax.Array, n_groups: int):
  """Per-group (row count [G], mean [G, W], unbiased variance [G, W]) from two passes over the rows.

  Args:
    rows_RxW: rows of all groups.
    valid_R: 1 for rows that count.
    group_R: group of each row (ids >= n_groups are ignored).
    n_groups: number of groups (static).
  """
  x = rows_RxW.astype(jnp.float32)
  w = valid_R.astype(jnp.float32)
  # Group sums as a [G, R] x [R, W] matmul with a weighted one-hot matrix (a scatter-add would run
  # serially on CPU).
  onehot_GxR = (group_R[None, :] == jnp.arange(n_groups)[:, None]).astype(jnp.float32) * w[None, :]
  m_G = jnp.sum(onehot_GxR, axis=1)
  mean_GxW = jnp.matmul(onehot_GxR, x, precision=HIGHEST) / jnp.maximum(m_G, 1.0)[:, None]
  mean_RxW = jnp.matmul(onehot_GxR.T, mean_GxW, precision=HIGHEST)  # each row's own group mean
  sq_GxW = jnp.matmul(onehot_GxR, jnp.square(x - mean_RxW), precision=HIGHEST)
  return m_G, mean_GxW, sq_GxW / jnp.maximum(m_G - 1.0, 1.0)[:, None]


def merge_groups(state: NormState, m_G: jax.Array, mean_GxW: jax.Array, var_GxW: jax.Array) -> NormState:
  """`merge` of groups 0, 1, ... in order (what `update` per group in turn gives)."""
  out, _ = jax.lax.scan(lambda st, g: (merge(st, *g), None), state, (m_G, mean_GxW, var_GxW))
  return out


def std(state: NormState) -> jax.Array:
  """sqrt(var / (n - 1 + eps)) [W]."""
  return jnp.sqrt(state.var / (state.n - 1.0 + EPS))


def normalize(state: NormState, x_RxW: jax.Array) -> jax.Array:
  """(x - mean) / (std + eps)."""
  return (x_RxW - state.mean[None, :]) / (std(state)[None, :] + EPS)
