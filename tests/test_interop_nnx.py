"""Flax NNX interop: an NNX Llama edited in place matches horse-jax's own edited model.

The NNX model (tests/nnx_llama.py) is written independently of horse_jax.models and holds the same
arrays as a horse-jax `Model`; each test compares what horse_jax.interop.nnx produces through NNX
with what horse-jax's hooks, hypernet editors and codebook functions produce on the horse-jax model.
"""

import dataclasses
import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nnx_llama  # noqa: E402

from horse_jax.data.tokenize import EditBatch  # noqa: E402
from horse_jax.editors import codebook, hypernet  # noqa: E402
from horse_jax.editors.codebook.query import make_query  # noqa: E402
from horse_jax.errors import UserError  # noqa: E402
from horse_jax.interop import nnx as hnnx  # noqa: E402
from horse_jax.models import Hooks, Model, apply, forward  # noqa: E402
from horse_jax.models.init import random_model, tiny_llama_config  # noqa: E402

DOWN = "model.layers.1.mlp.down_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"
# Jitted forwards on both sides (eager JAX compiles every op separately: slow for a test).
nnx_logits = nnx.jit(lambda m, input_ids, attention_mask: m(input_ids, attention_mask))
horse_logits = jax.jit(lambda m, input_ids, attention_mask: apply(m, input_ids, attention_mask))


@pytest.fixture(scope="module")
def models():
  """(horse-jax Model, NNX model) with the same weights, drawn with NumPy (no per-op compiles):
  kernels N(0, 0.1) so logits are O(1), norm weights 1 + N(0, 0.1) so a missing one shows."""
  cfg = tiny_llama_config(num_layers=2)
  rng = np.random.RandomState(3)

  def draw(path, leaf):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

  abstract = jax.eval_shape(lambda: random_model(cfg).params)
  model = Model(jax.tree_util.tree_map_with_path(draw, abstract), cfg)
  return model, nnx_llama.from_horse(model)


def _right_padded():
  ids = np.array([[1, 5, 6, 7, 9, 0], [1, 8, 9, 10, 0, 0], [1, 20, 21, 22, 23, 24]], np.int32)
  mask = (ids > 0).astype(np.int32)
  labels = np.full(ids.shape, -100, np.int32)
  labels[0, 2:4] = [7, 9]
  labels[1, 2] = 10
  labels[2, 3:5] = [23, 24]
  return EditBatch(ids, mask, labels, np.array([3, 3, 4], np.int32))


def test_nnx_llama_matches_horse_logits(models):
  model, nn = models
  ids = jnp.array([[0, 0, 1, 5, 6, 7], [1, 2, 3, 4, 5, 0], [1, 20, 21, 22, 23, 24]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
  ref = horse_logits(model, ids, mask)
  assert float(jnp.std(ref)) > 0.3  # O(1) logits: the comparisons below are not vacuous
  chex.assert_trees_all_close(nnx_logits(nn, ids, mask), ref, atol=2e-5)
  # The NNX Params read back as a horse-jax param tree are the very same arrays.
  chex.assert_trees_all_equal(hnnx.horse_params(nn), model.params)


def _loss(m, ids, mask, targets):
  """Sum of -log p(target) over real positions; m is either an NNX model or a horse forward fn."""
  logp = jax.nn.log_softmax(m(ids, mask), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)


def test_keys_and_value_grads_match_horse_hooks(models):
  model, nn = models
  batch = _right_padded()
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  targets = jnp.asarray(np.roll(batch.input_ids, -1, axis=1))
  names = (O_PROJ, DOWN)
  keys, grads, loss = hnnx.keys_and_value_grads(nn, names, _loss, ids, mask, targets)

  @jax.jit
  def reference(model, ids, mask, targets):
    keys = forward(model, ids, mask, hooks=Hooks(capture=names)).captured
    zeros = {n: jnp.zeros(ids.shape + (model.config.hidden_size,)) for n in names}
    def hooked_loss(off):
      return _loss(lambda i, a: forward(model, i, a, hooks=Hooks(offsets=off)).logits, ids, mask,
                   targets)

    loss, grads = jax.value_and_grad(hooked_loss)(zeros)
    return keys, grads, loss

  ref_keys, ref_grads, ref_loss = reference(model, ids, mask, targets)

  chex.assert_shape(keys[DOWN], (3, 6, model.config.intermediate_size))
  chex.assert_shape(grads[O_PROJ], (3, 6, model.config.hidden_size))
  chex.assert_trees_all_close(keys, ref_keys, atol=1e-4, rtol=1e-4)
  assert min(float(jnp.abs(g).max()) for g in ref_grads.values()) > 1e-3
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # The user's model is untouched: still plain Linears, same logits.
  assert type(nn.model.layers[1].mlp.down_proj) is nnx.Linear


@pytest.mark.parametrize("method", ["horse", pytest.param("malmen", marks=pytest.mark.slow),
                                    pytest.param("mend", marks=pytest.mark.slow)])
def test_shifts_written_with_nnx_update_match_horse_edited_model(models, method):
  model, nn = models
  mods = ("model.layers.0.mlp.down_proj", DOWN)
  shapes = hnnx.module_shapes(nn, mods)
  assert shapes == hypernet.module_shapes(model.params, mods)
  cfg = hypernet.HypernetConfig(method=method, modules=mods, rank=16, lr=1e-2, shapes=shapes)
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  batch = _right_padded()

  ref_shifts, ref_state = hypernet.edit(state, model, cfg, [batch])
  shifts, new_state = hnnx.edit(state, nn, cfg, [batch])
  chex.assert_trees_all_close(shifts, ref_shifts, atol=1e-6, rtol=1e-3)
  chex.assert_trees_all_close(new_state.norms, ref_state.norms, atol=1e-5, rtol=1e-4)
  assert min(float(jnp.abs(s).max()) for s in shifts.values()) > 1e-6

  before = {n: np.asarray(hnnx.linear_modules(nn)[n].kernel[...]) for n in mods}
  ids = jnp.asarray(batch.input_ids)
  mask = jnp.asarray(batch.attention_mask)
  logits_before = nnx_logits(nn, ids, mask)
  old = hnnx.apply_shifts(nn, shifts)
  try:
    for n in mods:  # kernel [in, out] += shift, checked in float64
      after = np.asarray(hnnx.linear_modules(nn)[n].kernel[...], np.float64)
      np.testing.assert_allclose(after, before[n] + np.asarray(shifts[n], np.float64), atol=1e-6)
    ref = horse_logits(hypernet.apply(model, ref_shifts), ids, mask)
    chex.assert_trees_all_close(nnx_logits(nn, ids, mask), ref, atol=1e-4)
    assert float(jnp.abs(ref - logits_before).max()) > 1e-4
  finally:
    nnx.update(nn, old)
  for n in mods:  # exact revert
    np.testing.assert_array_equal(np.asarray(hnnx.linear_modules(nn)[n].kernel[...]), before[n])


@functools.partial(jax.jit, static_argnames=("settings",))
def _codebook(model, settings, edit_ids, edit_prompt_len):
  """A codebook keyed by the queries of `edit_ids` (right-padded prompts), with random values."""
  x = forward(model, edit_ids, (edit_ids > 0).astype(jnp.int32),
              hooks=Hooks(capture=(settings.layer,))).captured[settings.layer]
  queries = jax.vmap(lambda x_t, p: make_query(x_t, p, 0, settings.query_selection_strategy,
                                                settings.normalize_codebook_keys))(x, edit_prompt_len - 1)
  d_in, d_out = x.shape[-1], model.config.hidden_size
  book = codebook.init(settings, d_in, d_out)
  n = queries.shape[0]
  values = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (n, d_out))
  return book.__class__(
      keys=book.keys.at[1:n + 1].set(queries), values=book.values.at[1:n + 1].set(values),
      labels=book.labels, radius=book.radius.at[1:n + 1].set(0.5), lora_a=book.lora_a,
      lora_b=book.lora_b, count=jnp.asarray(n + 1, jnp.int32), n_edits=jnp.asarray(n, jnp.int32))


def _settings(method):
  strategy = "last_prompt_token" if method == "grace" else "last_50_perc_prompt_tokens_avg"
  return codebook.CodebookSettings(method=method, layer=DOWN, initial_capacity=4,
                                   query_selection_strategy=strategy)


@pytest.mark.parametrize("method", ["horen", pytest.param("grace", marks=pytest.mark.slow)])
def test_codebook_module_matches_horse_codebook(models, method):
  model, nn = models
  settings = _settings(method)
  batch = _right_padded()
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  # Edits are the first two prompts; the third one must not match.
  book = _codebook(model, settings, ids[:2], jnp.asarray(batch.prompt_len[:2]))

  wrapped = hnnx.wrap_codebook(nn, book, settings)
  try:
    assert hnnx.codebook_modules(nn) == {DOWN: wrapped}
    chex.assert_trees_all_equal(wrapped.codebook, book)
    hnnx.set_edit_positions(nn, batch.prompt_len - 1, None, ids.shape[1])
    ref = codebook.edited_logits(model, book, ids, mask, jnp.asarray(batch.prompt_len),
                                 settings=settings)
    got = nnx_logits(nn, ids, mask)
    chex.assert_trees_all_close(got, ref, atol=1e-4)
    plain = horse_logits(model, ids, mask)
    changed = np.abs(np.asarray(ref - plain)).max(axis=(1, 2))
    assert changed[0] > 1e-2 and changed[1] > 1e-2 and changed[2] < 1e-4  # matches and a miss
    # A call shorter than the prompt (a KV-cache decode step) passes through: the edit acted when
    # the prompt was prefilled.
    x = jnp.ones((3, 1, model.config.intermediate_size))
    np.testing.assert_array_equal(wrapped(x), wrapped.linear(x))
    grown = codebook.grow(book, 8)  # after more edits the capacity may double
    wrapped.set_codebook(grown)
    chex.assert_trees_all_equal(wrapped.codebook, grown)
  finally:
    hnnx.unwrap_codebook(nn, DOWN)
  assert type(nn.model.layers[1].mlp.down_proj) is nnx.Linear
  chex.assert_trees_all_close(nnx_logits(nn, ids, mask), horse_logits(model, ids, mask), atol=2e-5)


@pytest.mark.slow
def test_codebook_module_generation_matches_horse_generate(models):
  """A plain no-cache greedy loop over the wrapped NNX model (one fixed [B, 8] buffer, unfilled
  slots masked) equals horse-jax's KV-cache generate with the codebook hook at prefill."""
  model, nn = models
  settings = _settings("horen")
  batch = _right_padded()
  book = _codebook(model, settings, jnp.asarray(batch.input_ids[:2]),
                   jnp.asarray(batch.prompt_len[:2]))
  left_ids = jnp.array([[0, 1, 5, 6], [1, 8, 9, 10]])
  left_mask = (left_ids > 0).astype(jnp.int32)
  ref_tokens = codebook.edited_generate(model, book, left_ids, left_mask, settings=settings,
                                        max_new_tokens=4)
  hnnx.wrap_codebook(nn, book, settings)
  try:
    hnnx.set_prompt_positions(nn, left_mask)
    seq = jnp.concatenate([left_ids, jnp.zeros((2, 4), jnp.int32)], axis=1)
    seq_mask = jnp.concatenate([left_mask, jnp.zeros((2, 4), jnp.int32)], axis=1)
    for t in range(4, 8):
      nxt = jnp.argmax(nnx_logits(nn, seq, seq_mask)[:, t - 1], axis=-1)
      seq, seq_mask = seq.at[:, t].set(nxt), seq_mask.at[:, t].set(1)
  finally:
    hnnx.unwrap_codebook(nn, DOWN)
  np.testing.assert_array_equal(np.asarray(seq[:, 4:]), np.asarray(ref_tokens))
  plain = codebook.edited_generate(model, codebook.init(settings, book.keys.shape[1],
                                                        book.values.shape[1]),
                                   left_ids, left_mask, settings=settings, max_new_tokens=4)
  assert not np.array_equal(np.asarray(plain), np.asarray(ref_tokens))  # the edit shows


@pytest.mark.slow
def test_horen_edits_on_the_nnx_weights_served_by_the_wrapped_module(models):
  """The whole HoReN flow for an NNX user: edit with horse-jax on `horse_params(nn)` (no copy),
  serve the codebook from the NNX model; the NNX logits equal horse-jax's edited logits."""
  model, nn = models
  shared = Model(hnnx.horse_params(nn), model.config)
  settings = dataclasses.replace(_settings("horen"), n_iter=10)
  batch = _right_padded()
  book, infos = codebook.apply_edits(shared, codebook.init(settings, 128, 64), batch, settings,
                                     progress=False)
  assert [info["match"] for info in infos] == [True, True, True]
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  ref = codebook.edited_logits(shared, book, ids, mask, jnp.asarray(batch.prompt_len),
                               settings=settings)
  hnnx.wrap_codebook(nn, book, settings)
  try:
    hnnx.set_edit_positions(nn, batch.prompt_len - 1, None, ids.shape[1])
    chex.assert_trees_all_close(nnx_logits(nn, ids, mask), ref, atol=1e-4)
  finally:
    hnnx.unwrap_codebook(nn, DOWN)
  assert float(jnp.abs(ref - horse_logits(model, ids, mask)).max()) > 1e-2


def test_apply_shifts_keeps_sharding_and_user_errors(models):
  _, nn = models
  mesh = jax.make_mesh((1, len(jax.devices())), ("data", "model"))
  linear = hnnx.linear_modules(nn)[DOWN]
  original = linear.kernel[...]
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model", None))
  linear.kernel.set_value(jax.device_put(original, spec))
  try:
    shift = jnp.ones(original.shape)
    old = hnnx.apply_shifts(nn, {DOWN: shift})
    assert linear.kernel[...].sharding == spec
    np.testing.assert_allclose(np.asarray(linear.kernel[...]), np.asarray(original) + 1.0,
                               atol=1e-6)
    nnx.update(nn, old)
    np.testing.assert_array_equal(np.asarray(linear.kernel[...]), np.asarray(original))
    with pytest.raises(UserError, match="no nnx.Linear named"):
      hnnx.apply_shifts(nn, {"model.layers.9.mlp.down_proj": shift})
    with pytest.raises(UserError, match="shape"):
      hnnx.apply_shifts(nn, {DOWN: shift.T})
    with pytest.raises(UserError, match="no nnx.Linear named 'model.layers.0.mlp.down'"):
      hnnx.keys_and_value_grads(nn, ("model.layers.0.mlp.down",), _loss)
    with pytest.raises(UserError, match="does not fit"):
      settings = _settings("horen")
      hnnx.wrap_codebook(nn, codebook.init(settings, 3, 4), settings)
  finally:
    linear.kernel.set_value(original)
