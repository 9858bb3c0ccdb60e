"""Routing statistics (horse_jax.eval.routing) against hand-built cases and a direct NumPy count."""

import numpy as np
import pytest

from horse_jax.eval.routing import separation


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hand_built_cosine_case():
  e = np.eye(3, dtype=np.float32)                                # three orthogonal keys
  r = _unit(np.array([[1, .1, 0], [.9, 1, 0], [0, 0, 1]], np.float32))
  u = _unit(np.array([[1, 1, 1], [0, 1, .05]], np.float32))
  out = separation(e, r, u, cosine=True, threshold=0.9)
  own = np.einsum("nd,nd->n", e, r)
  best = (r @ e.T).argmax(1)
  assert out["rephrase_top1"] == pytest.approx(np.mean(best == np.arange(3)), abs=1e-4)
  routed = (best == np.arange(3)) & ((r @ e.T).max(1) > 0.9)
  assert out["rephrase_routed"] == pytest.approx(routed.mean(), abs=1e-4)
  assert out["unrelated_leak"] == pytest.approx(np.mean((u @ e.T).max(1) > 0.9), abs=1e-4)
  assert out["own"]["p50"] == pytest.approx(np.median(own), abs=1e-4)


def test_auc_and_euclidean_against_direct_counts():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(40, 8))
  r = e + 0.3 * rng.normal(size=e.shape)
  u = rng.normal(size=(25, 8))
  out = separation(e, r, u, cosine=False, threshold=1.0)
  own = np.linalg.norm(e - r, axis=1)
  d_u = np.linalg.norm(u[:, None, :] - e[None], axis=2).min(1)
  auc = np.mean([[1.0 if a < b else 0.5 if a == b else 0.0 for b in d_u] for a in own])
  assert out["auc"] == pytest.approx(auc, abs=1e-4)
  d_r = np.linalg.norm(r[:, None, :] - e[None], axis=2)
  routed = (d_r.argmin(1) == np.arange(40)) & (d_r.min(1) < 1.0)
  assert out["rephrase_routed"] == pytest.approx(routed.mean(), abs=1e-4)
  assert out["unrelated_leak"] == pytest.approx(np.mean(d_u < 1.0), abs=1e-4)


def test_queries_are_the_codebook_editors_queries():
  """prompt_queries equals the normalized module input at the last prompt token, from a capture."""
  import jax.numpy as jnp
  from horse_jax.eval.routing import prompt_queries
  from horse_jax.models import Hooks, forward
  from horse_jax.models.init import random_model, tiny_llama_config

  class Tok:
    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text):
      return {"input_ids": [1] + [int(w) for w in text.split()]}

  model = random_model(tiny_llama_config(num_layers=2))
  name = "model.layers.1.mlp.down_proj"
  prompts = ["5 6 7", "8 9", "10 11 12 13"]
  got = prompt_queries(model, Tok(), prompts, layer=name, strategy="last_prompt_token", normalize=True,
                       batch_size=2)
  for i, p in enumerate(prompts):
    ids = jnp.array([Tok()(p)["input_ids"]])
    h = np.asarray(forward(model, ids, hooks=Hooks(capture=(name,))).captured[name])[0, -1]
    np.testing.assert_allclose(got[i], h / np.linalg.norm(h), rtol=1e-4, atol=1e-5)


def test_nearest_other_edit_and_its_auc_against_numpy():
  rng = np.random.default_rng(1)
  e = _unit(rng.normal(size=(30, 6)))
  r = _unit(e + 0.4 * rng.normal(size=e.shape))
  u = _unit(rng.normal(size=(12, 6)))
  for cosine in (True, False):
    out = separation(e, r, u, cosine=cosine, threshold=0.5)
    if cosine:
      pair, own = e @ e.T, np.einsum("nd,nd->n", e, r)
      np.fill_diagonal(pair, -np.inf)
      other, sign = pair.max(1), 1.0
    else:
      pair, own = np.linalg.norm(e[:, None] - e[None], axis=2), np.linalg.norm(e - r, axis=1)
      np.fill_diagonal(pair, np.inf)
      other, sign = pair.min(1), -1.0
    assert out["nearest_other_edit"]["p50"] == pytest.approx(np.median(other), abs=1e-4)
    auc = np.mean([[1.0 if sign * a > sign * b else 0.5 if a == b else 0.0 for b in other] for a in own])
    assert out["auc_other_edit"] == pytest.approx(auc, abs=1e-4)


def test_grace_coverage_hand_built():
  from horse_jax.eval.routing import grace_coverage
  # row 0 unused; rows 1, 2 share label 7 (row 2's ball is wide), row 3 has label 9.
  keys = np.array([[50, 50], [0, 0], [10, 0], [0, 10]], np.float32)
  radius = np.array([0, 1, 4, 1], np.float32)
  labels = np.array([[0, 0], [7, 0], [7, 0], [9, 0]], np.int32)
  edit_q = np.array([[0.5, 0], [10, 0.5], [0, 9.5], [0, 0.2]], np.float32)   # rows 1, 2, 3, 1
  reph_q = np.array([[7, 0], [10, 3], [0, 7], [0, 8]], np.float32)
  # rephrasing 0: nearest row 2 (d 3 <= 4), same label as its edit's row 1 -> same-label row
  # rephrasing 1: own row 2 (d 3 <= 4); 2: nearest row 3 at d 3 > 1 -> unrouted;
  # 3: nearest row 3 (d 2 > 1) -> unrouted
  unrel_q = np.array([[30, 30], [9, 1]], np.float32)
  out = grace_coverage(keys, radius, labels, 4, edit_q, reph_q, unrel_q)
  assert out["rows"] == 3 and out["edits"] == 4 and out["edit_routed"] == 1.0
  assert out["rephrase_routed"] == 0.5
  assert out["rephrase_own_row"] == 0.25 and out["rephrase_same_label_row"] == 0.25
  assert out["rephrase_other_label_row"] == 0.0 and out["unrelated_routed"] == 0.5
  own_ratio = np.array([7 / 1, 3 / 4, 3 / 1, 8 / 1])
  assert out["own_distance_over_radius"]["p50"] == pytest.approx(np.median(own_ratio), abs=1e-4)
