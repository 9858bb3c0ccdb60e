"""Metric kernels vs hand-computed cases and an independent NumPy float64 reference."""

import numpy as np
import pytest

from horse_jax.eval import metrics

I = -100


def one_hot_logits(pred_BxT, vocab=6):
  """Logits whose argmax is pred (a margin of 1 over zeros)."""
  pred = np.asarray(pred_BxT)
  out = np.zeros(pred.shape + (vocab,), np.float32)
  np.put_along_axis(out, pred[..., None], 1.0, axis=-1)
  return out


def test_token_accuracy_hand_cases():
  # Row 0: a 3-token target, 2 of 3 right (partial credit); padding positions ignored.
  # Row 1: a 1-token target, right. Row 2: no labels at all -> NaN.
  # Row 3: the model is "right" only at a padded position -> 0.
  pred = [[0, 3, 4, 5, 1], [2, 2, 2, 2, 2], [0, 0, 0, 0, 0], [4, 4, 1, 1, 1]]
  labels = [[I, 3, 4, 2, I], [I, I, 2, I, I], [I, I, I, I, I], [I, 3, I, I, I]]
  got = np.asarray(metrics.token_accuracy(one_hot_logits(pred), np.array(labels, np.int32)))
  assert got.shape == (4,)
  np.testing.assert_allclose(got[[0, 1, 3]], [2 / 3, 1.0, 0.0], rtol=1e-6)
  assert np.isnan(got[2])


def test_agreement_hand_cases():
  pre = [[1, 2, 3, 4], [5, 5, 5, 5]]
  post = [[1, 0, 3, 0], [5, 5, 5, 5]]
  labels = [[I, 9 % 6, 1, 1], [I, I, I, 2]]  # compare positions 1..3 in row 0, position 3 in row 1
  got = np.asarray(metrics.agreement(one_hot_logits(pre), one_hot_logits(post), np.array(labels, np.int32)))
  # Row 0: positions 1,2,3 -> agree at 2 only -> 1/3 (labels' values do not matter, only their mask).
  np.testing.assert_allclose(got, [1 / 3, 1.0], rtol=1e-6)


def test_generation_accuracy_hand_cases():
  generated = np.array([[7, 8, 9, 1], [7, 8, 9, 1], [3, 3, 3, 3]], np.int32)
  targets = np.array([[7, 0, 9, -1], [7, 8, -1, -1], [3, -1, -1, -1]], np.int32)
  lengths = np.array([3, 2, 0], np.int32)
  got = np.asarray(metrics.generation_accuracy(generated, targets, lengths))
  np.testing.assert_allclose(got[:2], [2 / 3, 1.0], rtol=1e-6)
  assert np.isnan(got[2])


def test_overall_ignores_missing_parts():
  np.testing.assert_allclose(float(metrics.overall(0.9, 0.6, 0.3)), 0.6, rtol=1e-6)
  np.testing.assert_allclose(float(metrics.overall(1.0, np.nan, 0.5)), 0.75, rtol=1e-6)
  assert np.isnan(float(metrics.overall(np.nan, np.nan, np.nan)))
  vec = np.asarray(metrics.overall(np.array([1.0, 0.0]), np.array([0.5, 0.0]), np.array([0.0, np.nan])))
  np.testing.assert_allclose(vec, [0.5, 0.0], rtol=1e-6)


def reference_accuracy(logits, labels):
  """Float64 NumPy reference from the definition (loops, no shared code)."""
  out = []
  for b in range(labels.shape[0]):
    hits, count = 0, 0
    for t in range(labels.shape[1]):
      if labels[b, t] != I:
        count += 1
        hits += int(np.argmax(logits[b, t].astype(np.float64)) == labels[b, t])
    out.append(hits / count if count else np.nan)
  return np.array(out)


def reference_agreement(pre, post, labels):
  out = []
  for b in range(labels.shape[0]):
    pos = [t for t in range(labels.shape[1]) if labels[b, t] != I]
    same = [np.argmax(pre[b, t]) == np.argmax(post[b, t]) for t in pos]
    out.append(np.mean(same) if pos else np.nan)
  return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logits_vs_numpy(seed):
  rng = np.random.default_rng(seed)
  b, t, v = 7, 11, 5  # small vocab so argmax hits the label often enough for partial credit
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  pre = rng.normal(size=(b, t, v)).astype(np.float32)
  post = np.where(rng.random((b, t, 1)) < 0.5, pre, logits).astype(np.float32)
  labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
  labels[rng.random((b, t)) < 0.4] = I
  labels[0] = I  # one row without labels
  got = np.asarray(metrics.token_accuracy(logits, labels))
  np.testing.assert_allclose(got, reference_accuracy(logits, labels), rtol=1e-6, equal_nan=True)
  got = np.asarray(metrics.agreement(pre, post, labels))
  np.testing.assert_allclose(got, reference_agreement(pre, post, labels), rtol=1e-6, equal_nan=True)
  assert np.all(np.isfinite(got[1:]))


def test_agreement_with_cached_predictions_matches_agreement():
  rng = np.random.default_rng(5)
  b, t, v = 6, 9, 4
  pre = rng.normal(size=(b, t, v)).astype(np.float32)
  post = rng.normal(size=(b, t, v)).astype(np.float32)
  labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
  labels[rng.random((b, t)) < 0.5] = I
  labels[2] = I
  pred = np.asarray(metrics.answer_predictions(pre, labels))
  want_pred = np.where(labels != I, np.argmax(pre, axis=-1), -1)
  np.testing.assert_array_equal(pred, want_pred)
  got = np.asarray(metrics.agreement_with_predictions(pred, post, labels))
  np.testing.assert_allclose(got, reference_agreement(pre, post, labels), rtol=1e-6, equal_nan=True)
