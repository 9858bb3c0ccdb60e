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
