"""The decoupled meta-gradient (`meta.decoupled_grads_stacked`: vjp with cotangent dLoss/dS, chunked)
equals jax.grad end to end through `shifts.solve_stacked` (both driven by the stage-by-stage oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.editors import hypernet
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules

import hypernet_oracle as oracle
from hypernet_oracle import shift_loss_grad
from test_hypernet_shifts import batches_of, random_pairs, randomize


def flat(tree):
  return np.concatenate([np.ravel(np.float64(x)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("method,spread", [
    ("horse", "reference"), ("malmen", "reference"),
    pytest.param("horse", "gram_schmidt", marks=pytest.mark.slow),
    pytest.param("mend", "reference", marks=pytest.mark.slow)])
def test_decoupled_equals_end_to_end(method, spread):
  model = random_model(tiny_llama_config(num_layers=3), seed=4)
  rng = np.random.default_rng(1)
  pairs = random_pairs(rng, 16)
  edits = batches_of(pairs, 8)
  rephrase = batches_of(random_pairs(rng, 16), 8)
  loc = batches_of(random_pairs(rng, 16), 8)
  mods = tuple(default_edit_modules(model.config, 3))
  cfg = hypernet.HypernetConfig(method=method, modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=12,
                                chunk=16, token="all" if method == "mend" else "ans", spread=spread,
                                lm_batch=8, loc_coef=0.7)
  state = randomize(hypernet.init(cfg, jax.random.PRNGKey(2)), seed=3)
  shifts, diffs, cache, chunk, state = oracle.predict(state, model, cfg, edits)
  assert cache.keys[mods[0]].shape[0] > chunk  # several chunks: the chunked backward is exercised
  _, _, dshifts = oracle.meta_loss_grads(model, cfg, shifts, rephrase, loc)
  got = oracle.meta_gradients(state, cache, cfg, chunk, shifts, diffs, dshifts)

  kind, coef = ("ce", 1.0) if method == "horse" else ("kl", cfg.loc_coef)
  low = cfg.lowest_layer

  def end_to_end(nets):
    s, _ = oracle.shifts_from_cache(nets, state.norms, cache, cfg, chunk)
    total = 0.0
    for b in rephrase:
      total += shift_loss_grad(model, s, b.input_ids, b.attention_mask, b.labels, "ce", low)[0]
    for b in loc:
      total += coef * shift_loss_grad(model, s, b.input_ids, b.attention_mask, b.labels, kind, low)[0]
    return total

  want = jax.jit(jax.grad(end_to_end))(state.nets)
  if method != "malmen":  # only MALMEN trains lamda
    want = {k: {**g, "lamda": jnp.zeros_like(g["lamda"])} for k, g in want.items()}
  else:
    assert np.abs(flat([g["lamda"] for g in want.values()])).max() > 0
  a, b = flat(got), flat(want)
  assert np.linalg.norm(b) > 0
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3, np.linalg.norm(a - b) / np.linalg.norm(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.float64(x), np.float64(y), rtol=2e-3,
                               atol=2e-3 * np.abs(np.float64(y)).max() + 1e-12, err_msg=str(path))
