"""The running normalizer against hand-computed numbers (the reference's running mean and sum of
squares: std = sqrt(var / (n - 1 + eps)), applied as (x - mean) / (std + eps))."""

import jax.numpy as jnp
import numpy as np

from horse_jax.editors.hypernet import normalizer

EPS = 2.0 ** -23


def test_two_updates_by_hand():
  s = normalizer.init(2)
  s = normalizer.update(s, jnp.array([[1., 2.], [3., 4.], [5., 9.]]))
  # mean [3, 5]; unbiased var [4, 13]; var = 3 * [4, 13].
  np.testing.assert_allclose(s.n, 3.0)
  np.testing.assert_allclose(s.mean, [3., 5.])
  np.testing.assert_allclose(s.var, [12., 39.])
  # Second batch [[7, 1], [9, 3]] plus a padding row that must not count:
  # batch mean [8, 2], unbiased var [2, 2], delta [5, -3], n' = 5
  # mean = [3 + 2*5/5, 5 - 2*3/5] = [5, 3.8]; var = [12 + 4 + 3*2*25/5, 39 + 4 + 3*2*9/5] = [46, 53.8]
  s = normalizer.update(s, jnp.array([[7., 1.], [9., 3.], [100., -100.]]), jnp.array([1, 1, 0]))
  np.testing.assert_allclose(s.n, 5.0)
  np.testing.assert_allclose(s.mean, [5., 3.8], rtol=1e-6)
  np.testing.assert_allclose(s.var, [46., 53.8], rtol=1e-6)
  std = np.sqrt(np.array([46., 53.8]) / (4 + EPS))
  np.testing.assert_allclose(normalizer.std(s), std, rtol=1e-6)
  out = normalizer.normalize(s, jnp.array([[5., 3.8], [7., 5.]]))
  np.testing.assert_allclose(out[0], [0., 0.], atol=1e-6)
  np.testing.assert_allclose(out[1], [2. / (std[0] + EPS), 1.2 / (std[1] + EPS)], rtol=1e-5)


def test_all_padding_is_a_no_op():
  s = normalizer.update(normalizer.init(3), jnp.ones((4, 3)) * 2.0)
  t = normalizer.update(s, jnp.ones((2, 3)), jnp.zeros((2,)))
  for a, b in zip(s, t):
    np.testing.assert_array_equal(a, b)
