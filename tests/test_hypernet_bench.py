"""`benchmarks.hypernet.unrolled_flops` counts every iteration of a program's loops."""

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import hypernet as bench


def _chain(x, mats):
  """x @ m_0 @ m_1 @ ... by lax.scan, then a lax.map of one more product per matrix."""
  out, _ = lax.scan(lambda c, m: (c @ m, None), x, mats)
  return out, lax.map(lambda m: out @ m, mats)


def test_unrolled_flops_counts_every_iteration():
  n, d = 5, 16
  x = jnp.ones((d, d), jnp.float32)
  mats = jnp.ones((n, d, d), jnp.float32)
  fn = jax.jit(_chain)
  per_product = 2 * d ** 3  # one [d, d] x [d, d] matmul
  rolled = bench._flops(fn.lower(x, mats).compile())
  assert rolled < n * per_product  # XLA counts each loop body once
  assert bench.unrolled_flops(fn, x, mats) == 2 * n * per_product
  # The patch is undone: the same function lowers with its loops again.
  assert bench._flops(fn.lower(x, mats).compile()) == rolled
  assert lax.scan.__module__.startswith("jax")
