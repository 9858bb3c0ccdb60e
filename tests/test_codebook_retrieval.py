"""Queries and damped Hopfield retrieval vs NumPy float64 implementations of the
HoReN reference formulas (query selection, damped Hopfield iteration, strict threshold)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.editors.codebook.query import make_query
from horse_jax.editors.codebook.retrieval import retrieve, retrieve_batch, retrieve_found

# Jitted once per static configuration; the float settings stay traced (keeps the test fast).
jit_retrieve = jax.jit(retrieve, static_argnames=("max_iter", "normalize"))
jit_query = jax.jit(make_query, static_argnames=("strategy", "normalize"))

STRATEGIES = ["last_prompt_token", "first_prompt_token", "last_50_perc_prompt_tokens_avg",
              "last_60_perc_prompt_tokens_avg", "last_33_perc_prompt_tokens_avg",
              "last_100_perc_prompt_tokens_avg", "last_1_prompt_tokens_avg",
              "last_3_prompt_tokens_avg", "last_20_prompt_tokens_avg"]


def np_query(h, p, start, strategy, normalize):
  n_prompt = p - start + 1  # P
  if strategy == "last_prompt_token":
    q = h[p]
  elif strategy == "first_prompt_token":
    q = h[start]
  else:
    parts = strategy.split("_")
    num = int(parts[1])
    k = max(math.ceil(n_prompt * num / 100), 1) if "perc" in strategy else min(num, n_prompt)
    q = h[p - k + 1:p + 1].mean(axis=0)
  return q / np.linalg.norm(q) if normalize else q


def np_retrieve(q, keys, count, alpha, beta, eps, max_iter, threshold, normalize):
  keys = keys[:count].astype(np.float64)
  norm = (lambda v: v / np.linalg.norm(v)) if normalize else (lambda v: v)
  xi = q.astype(np.float64)
  for _ in range(max_iter):
    z = beta * keys @ xi
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    r = norm(pi @ keys)
    if np.linalg.norm(r - xi) < eps:
      break
    xi = norm((1 - alpha) * xi + alpha * r)
  s = keys @ xi
  j = int(np.argmax(s))
  return j, s[j], s[j] > threshold, xi


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("normalize", [True, False])
def test_query_matches_numpy(strategy, normalize):
  rng = np.random.default_rng(1)
  h = rng.normal(size=(16, 6))
  for p, start in [(0, 0), (4, 0), (9, 0), (15, 0), (12, 5), (15, 15)]:
    got = jit_query(jnp.asarray(h, jnp.float32), p, start, strategy=strategy, normalize=normalize)
    want = np_query(h, p, start, strategy, normalize)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_perc_window_hand_computed():
  # P = 7 prompt tokens, 50% -> k = ceil(3.5) = 4: mean of h[3..6].
  h = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  q = make_query(jnp.asarray(h), 6, 0, "last_50_perc_prompt_tokens_avg", False)
  np.testing.assert_allclose(np.asarray(q), [4.5, 4.5])
  # P = 1: k = max(ceil(0.5), 1) = 1.
  q = make_query(jnp.asarray(h), 0, 0, "last_50_perc_prompt_tokens_avg", False)
  np.testing.assert_allclose(np.asarray(q), [0.0, 0.0])


CASES = [
    dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=1),
    dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=0),
    dict(alpha=0.5, beta=5.0, eps=1e-5, max_iter=3),
    dict(alpha=0.3, beta=50.0, eps=1e-5, max_iter=10),
    dict(alpha=0.1, beta=20.0, eps=10.0, max_iter=5),  # stops at once: xi = q
    dict(alpha=1.0, beta=1.0, eps=1e-5, max_iter=2),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_retrieval_matches_numpy(case, normalize):
  rng = np.random.default_rng(2)
  d, cap, count = 8, 16, 11
  keys = rng.normal(size=(cap, d))
  if normalize:
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  else:
    keys *= 0.3
  keys[count:] = 100.0  # rows beyond count must not take part
  for trial in range(4):
    q = keys[trial] + 0.3 * rng.normal(size=d) if trial < 3 else rng.normal(size=d)
    if normalize:
      q /= np.linalg.norm(q)
    else:
      q *= 0.3
    for threshold in (0.0, 0.5, 0.9):
      got = jit_retrieve(jnp.asarray(q, jnp.float32), jnp.asarray(keys, jnp.float32), count,
                     threshold=threshold, normalize=normalize, **case)
      j, s, match, xi = np_retrieve(q, keys, count, threshold=threshold, normalize=normalize, **case)
      assert int(got.index) == j
      np.testing.assert_allclose(float(got.score), s, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(np.asarray(got.xi), xi, rtol=1e-4, atol=1e-5)
      if abs(s - threshold) > 1e-4:
        assert bool(got.match) == match
      assert np.all(np.isneginf(np.asarray(got.scores)[count:]))


def test_threshold_is_strict():
  keys = jnp.asarray([[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]], jnp.float32)
  q = jnp.asarray([1.0, 0.0], jnp.float32)
  kw = dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=0, normalize=False)
  at = retrieve(q, keys, 2, threshold=0.5, **kw)
  assert int(at.index) == 1 and float(at.score) == 0.5 and not bool(at.match)
  assert bool(retrieve(q, keys, 2, threshold=0.4999, **kw).match)


def test_batch_equals_single_and_jits():
  rng = np.random.default_rng(3)
  keys = rng.normal(size=(8, 5)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  qs = rng.normal(size=(6, 5)).astype(np.float32)
  qs /= np.linalg.norm(qs, axis=1, keepdims=True)
  kw = dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=2, threshold=0.3, normalize=True)
  batch = jax.jit(lambda q, k: retrieve_batch(q, k, 7, **kw))(qs, keys)
  for i in range(6):
    one = retrieve(jnp.asarray(qs[i]), jnp.asarray(keys), 7, **kw)
    assert int(batch.index[i]) == int(one.index)
    np.testing.assert_allclose(float(batch.score[i]), float(one.score), rtol=1e-6)


jit_found = jax.jit(retrieve_found, static_argnames=("max_iter", "normalize", "candidates"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("candidates", [1, 64])
def test_found_matches_numpy(case, normalize, candidates):
  """The batched inference retrieval (final scores on candidate rows, else the full product) gives
  the NumPy reference's j*, s[j*] and match; candidates=1 forces the full product on most queries."""
  rng = np.random.default_rng(5)
  d, cap, count = 8, 16, 11
  keys = rng.normal(size=(cap, d))
  if normalize:
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  else:
    keys *= 0.3
  keys[count:] = 100.0  # rows beyond count must not take part
  qs = np.concatenate([keys[:5] + 0.05 * rng.normal(size=(5, d)), rng.normal(size=(3, d))])
  qs = qs / np.linalg.norm(qs, axis=1, keepdims=True) if normalize else qs * 0.3
  for threshold in (0.0, 0.9):
    got = jit_found(jnp.asarray(qs, jnp.float32), jnp.asarray(keys, jnp.float32), count,
                    threshold=threshold, normalize=normalize, candidates=candidates, **case)
    for i, q in enumerate(qs):
      j, s, match, _ = np_retrieve(q, keys, count, threshold=threshold, normalize=normalize, **case)
      assert int(got.index[i]) == j
      np.testing.assert_allclose(float(got.score[i]), s, rtol=1e-4, atol=1e-5)
      if abs(s - threshold) > 1e-4:
        assert bool(got.match[i]) == match


def test_found_keeps_the_first_of_tied_rows():
  """A key appended twice (the same prompt edited again): the earlier row wins, as in `retrieve`,
  also when only one candidate is scored exactly."""
  rng = np.random.default_rng(6)
  keys = rng.normal(size=(8, 6)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  keys[5] = keys[2]
  q = keys[2:3] + np.float32(1e-3)
  kw = dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=1, threshold=0.5, normalize=True)
  for candidates in (1, 2, 8):
    got = retrieve_found(jnp.asarray(q), jnp.asarray(keys), 7, candidates=candidates, **kw)
    assert int(got.index[0]) == int(retrieve(jnp.asarray(q[0]), jnp.asarray(keys), 7, **kw).index) == 2


def test_fitted_book_keeps_live_rows_and_retrievals():
  """`state.fitted` cuts a preallocated codebook to its live rows rounded up to capacity / parts;
  retrieval over the cut book is the same."""
  import dataclasses
  from horse_jax.editors.codebook import state
  from horse_jax.editors.codebook.settings import CodebookSettings
  rng = np.random.default_rng(7)
  settings = CodebookSettings(layer="model.layers.0.mlp.down_proj", initial_capacity=64)
  book = state.init(settings, 6, 3)
  keys = rng.normal(size=(64, 6)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  book = dataclasses.replace(book, keys=jnp.asarray(keys), count=jnp.asarray(19, jnp.int32))
  cut = state.fitted(book, parts=16)
  assert cut.capacity == 20 and cut.values.shape == (20, 3) and int(cut.count) == 19
  assert state.fitted(dataclasses.replace(book, count=jnp.asarray(61, jnp.int32))).capacity == 64
  qs = jnp.asarray(keys[:5] + 0.1 * rng.normal(size=(5, 6)).astype(np.float32))
  kw = dict(alpha=0.1, beta=20.0, eps=1e-5, max_iter=1, threshold=0.5, normalize=True)
  a = retrieve_found(qs, book.keys, book.count, **kw)
  b = retrieve_found(qs, cut.keys, cut.count, **kw)
  np.testing.assert_array_equal(np.asarray(a.index), np.asarray(b.index))
  np.testing.assert_allclose(np.asarray(a.score), np.asarray(b.score), rtol=1e-6)
