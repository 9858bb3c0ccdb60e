"""HoReN/GRACE edits on a tiny model: add/reuse decisions, position-p-only changes, GRACE radius
rules and replacement, LoRA mode, and one compilation per capacity bucket."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors.codebook import adapter, edit, grace, state
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.editors.codebook.state import label_key
from horse_jax.models import Hooks, Model, forward
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import get_kernel, module_names

LAYER = "model.layers.2.mlp.down_proj"
T = 16


@pytest.fixture(scope="module")
def model():
  return random_model(tiny_llama_config(), seed=0)


def make_batch(prompts, targets, t=T):
  """EditBatch from token-id lists (BOS-free synthetic prompts), tokenized as `tokenize_edits` lays
  them out: prompt then target[:-1], the target as labels from the last prompt token on,
  prompt_len = len(prompt)."""
  n = len(prompts)
  ids = np.zeros((n, t), np.int32)
  mask = np.zeros((n, t), np.int32)
  labels = np.full((n, t), IGNORE, np.int32)
  plen = np.zeros((n,), np.int32)
  for i, (p, y) in enumerate(zip(prompts, targets)):
    seq = list(p) + list(y)[:-1]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    labels[i, len(p) - 1:len(p) - 1 + len(y)] = y
    plen[i] = len(p)
  return EditBatch(ids, mask, labels, plen)


def settings(**kw):
  base = dict(layer=LAYER, n_iter=3, initial_capacity=4, hopfield_key_match_threshold=0.7)
  base.update(kw)
  return CodebookSettings(**base)


def layer_input(model, batch):
  """The wrapped module's input [B, T, d_in] (float64), from a plain forward with capture."""
  out = forward(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                hooks=Hooks(capture=(LAYER,)))
  return np.asarray(out.captured[LAYER], np.float64)


def np_query_perc50(x_TxD, p):
  k = max(int(np.ceil((p + 1) * 50 / 100)), 1)
  q = x_TxD[p - k + 1:p + 1].mean(0)
  return q / np.linalg.norm(q)


def test_add_reuse_decisions(model):
  st = settings()
  batch = make_batch([[5, 9, 17, 33, 2], [5, 9, 17, 33, 2], [5, 9, 17, 33, 2], [70, 71, 3]],
                     [[40, 41], [40, 41], [50, 51], [40, 41]])
  book = state.init(st, 128, 64)
  book, i0 = edit.apply_edit(model, book, batch, 0, st)
  assert bool(i0.added) and int(i0.index) == 1 and int(book.count) == 2
  # The stored key is the unrefined normalized query of the edit (NumPy from a plain forward).
  x = layer_input(model, batch)
  np.testing.assert_allclose(np.asarray(book.keys[1]), np_query_perc50(x[0], 4), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(book.labels[1]), label_key(batch.labels[0], 6, "mean"))
  # Same prompt, same target: score above threshold and same label -> reuse row 1.
  book, i1 = edit.apply_edit(model, book, batch, 1, st)
  assert not bool(i1.added) and int(i1.index) == 1 and int(book.count) == 2
  assert float(i1.first_score) > st.hopfield_key_match_threshold
  # Same prompt, different target: label differs -> a new key.
  book, i2 = edit.apply_edit(model, book, batch, 2, st)
  assert bool(i2.added) and int(book.count) == 3
  # Same label but a threshold nothing can pass -> a new key.
  strict = dataclasses.replace(st, hopfield_key_match_threshold=1.5)
  book, i3 = edit.apply_edit(model, book, batch, 0, strict)
  assert bool(i3.added) and int(book.count) == 4
  assert int(book.n_edits) == 4


def test_label_keys():
  a = np.asarray([IGNORE, IGNORE, 7, 9, IGNORE], np.int32)
  b = np.asarray([IGNORE, IGNORE, 9, 7, IGNORE], np.int32)  # same mean, different tokens
  c = np.asarray([IGNORE, 7, 9], np.int32)  # same tokens, other positions and length
  assert np.array_equal(label_key(a, 4, "mean"), label_key(b, 4, "mean"))  # the reference's rule
  assert not np.array_equal(label_key(a, 4, "exact"), label_key(b, 4, "exact"))
  assert not np.array_equal(label_key(a, 4, "exact"), label_key(c, 3, "exact"))
  assert np.array_equal(label_key(a, 4, "exact"), label_key(a[:4], 4, "exact"))  # padding ignored


def test_only_position_p_changes(model):
  st = settings(hopfield_key_match_threshold=0.5)
  batch = make_batch([[5, 9, 17, 33, 2], [8, 8, 60, 61, 62, 63, 64]], [[40, 41], [50]])
  book = state.init(st, 128, 64)
  book, _ = edit.apply_edit(model, book, batch, 0, st)
  book, _ = edit.apply_edit(model, book, batch, 1, st)
  x = layer_input(model, batch)
  w = np.asarray(get_kernel(model.params, LAYER), np.float64)
  y = x @ w
  p = batch.prompt_len - 1
  fn = adapter.make_adapter(book, st, jnp.asarray(p))
  y_new = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), np.float64)
  diff = np.abs(y_new - y).sum(-1)
  for b in range(2):
    others = np.delete(diff[b], p[b])
    assert np.all(others < 1e-4)
    # At p the change is the retrieved value (each edit's own key matches).
    np.testing.assert_allclose(y_new[b, p[b]] - y[b, p[b]], np.asarray(book.values[b + 1]),
                               rtol=1e-3, atol=1e-3)
  # Through the whole model: logits before p are untouched, at p they change.
  hooks = Hooks(adapters={LAYER: fn})
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  base = np.asarray(forward(model, ids, mask).logits)
  edited = np.asarray(forward(model, ids, mask, hooks=hooks).logits)
  for b in range(2):
    np.testing.assert_array_equal(edited[b, :p[b]], base[b, :p[b]])
    assert np.abs(edited[b, p[b]] - base[b, p[b]]).max() > 1e-3


def test_unmatched_query_changes_nothing(model):
  st = settings(hopfield_key_match_threshold=0.999999)
  batch = make_batch([[5, 9, 17, 33, 2], [90, 91, 92, 93]], [[40], [41]])
  book = state.init(st, 128, 64)
  book, _ = edit.apply_edit(model, book, batch, 0, st)
  x = layer_input(model, batch)
  y = x @ np.asarray(get_kernel(model.params, LAYER), np.float64)
  fn = adapter.make_adapter(book, st, jnp.asarray(batch.prompt_len - 1))
  y_new = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(y_new[1], y[1], atol=1e-5)


def test_edit_learns_its_target(model):
  st = settings(n_iter=50)
  batch = make_batch([[5, 9, 17, 33, 2]], [[40]])
  book = state.init(st, 128, 64)
  book, info = edit.apply_edit(model, book, batch, 0, st)
  # A random tiny model has small logits, so the CE cannot get near 0; the argmax flips.
  assert float(info.loss_last) < float(info.loss_first) - 0.5
  assert float(info.edit_acc) == 1.0


def test_grace_rules_hand_computed():
  eps = 1.0
  keys = jnp.asarray([[9.0, 9.0], [0.0, 0.0], [10.0, 0.0], [0.0, 0.0]], jnp.float32)
  radius = jnp.asarray([0.0, 1.0, 1.0, 0.0], jnp.float32)
  labels = jnp.asarray([[0, 0], [1, 0], [2, 0], [0, 0]], jnp.int32)
  lab1, lab3 = jnp.asarray([1, 0], jnp.int32), jnp.asarray([3, 0], jnp.int32)

  def decide(q, label, count=3):
    return grace.decide(jnp.asarray(q, jnp.float32), label, keys, radius, labels, count, eps)

  # Empty codebook (only row 0, which GRACE ignores even when close): add with radius eps.
  d = decide([9.0, 9.0], lab1, count=1)
  assert not bool(d.reuse) and not bool(d.split) and float(d.new_key_radius) == 1.0
  # Inside the ball, same label: reuse, radius unchanged (max(1, 0.5)).
  d = decide([0.5, 0.0], lab1)
  assert bool(d.reuse) and int(d.index) == 1 and float(d.new_radius_nearest) == 1.0
  # Balls touch (1.5 <= 1 + 1), same label: reuse and expand the radius to 1.5.
  d = decide([1.5, 0.0], lab1)
  assert bool(d.reuse) and float(d.new_radius_nearest) == 1.5
  # Balls touch, other label: split both radii to 1.5 / 2.
  d = decide([1.5, 0.0], lab3)
  assert bool(d.split) and not bool(d.reuse)
  assert float(d.new_radius_nearest) == 0.75 and float(d.new_key_radius) == 0.75
  # Far away (2.5 > 2): add with radius eps, the nearest ball is untouched.
  d = decide([0.0, 2.5], lab1)
  assert not bool(d.reuse) and not bool(d.split)
  assert float(d.new_radius_nearest) == 1.0 and float(d.new_key_radius) == 1.0
  # Lookup: within the radius matches (<=), outside does not.
  assert bool(grace.lookup(jnp.asarray([1.0, 0.0]), keys, radius, 3).match)
  assert not bool(grace.lookup(jnp.asarray([1.01, 0.0]), keys, radius, 3).match)


def test_grace_replaces_output(model):
  st = settings(method="grace", query_selection_strategy="last_prompt_token",
                normalize_codebook_keys=False, grace_eps=1e-3,
                n_iter=5)
  batch = make_batch([[5, 9, 17, 33, 2], [90, 91, 92, 93]], [[40], [41]])
  book = state.init(st, 128, 64)
  book, info = edit.apply_edit(model, book, batch, 0, st)
  assert bool(info.added) and bool(info.match) and float(book.radius[1]) == pytest.approx(1e-3)
  x = layer_input(model, batch)
  y = x @ np.asarray(get_kernel(model.params, LAYER), np.float64)
  p = batch.prompt_len - 1
  fn = adapter.make_adapter(book, st, jnp.asarray(p))
  y_new = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(y_new[0, p[0]], np.asarray(book.values[1]), rtol=1e-6)  # replaced
  np.testing.assert_allclose(y_new[1], y[1], atol=1e-5)  # outside every ball: unchanged
  # The same edit again falls in its own ball with the same label: reuse.
  book, info = edit.apply_edit(model, book, batch, 0, st)
  assert not bool(info.added) and int(book.count) == 2


def test_lora_mode(model):
  st = settings(adapter_mode="lora", lora_rank=3, n_iter=10)
  book = state.init(st, 128, 64)
  assert book.lora_a.shape == (4, 3, 64) and book.lora_b.shape == (4, 64, 3)
  y = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
  a = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64)), jnp.float32)
  # B = 0 (its initialisation): the entry is a no-op even when matched.
  np.testing.assert_array_equal(
      np.asarray(adapter.new_output(st, y, jnp.asarray(True), jnp.zeros(64), a, jnp.zeros((64, 3)))),
      np.asarray(y))
  b = jnp.asarray(np.random.default_rng(2).normal(size=(64, 3)), jnp.float32)
  want = np.asarray(y, np.float64) + st.lora_scale * (np.asarray(b, np.float64) @ (
      np.asarray(a, np.float64) @ np.asarray(y, np.float64)))
  np.testing.assert_allclose(
      np.asarray(adapter.new_output(st, y, jnp.asarray(True), jnp.zeros(64), a, b)), want,
      rtol=1e-4, atol=1e-4)
  batch = make_batch([[5, 9, 17, 33, 2]], [[40]])
  book, info = edit.apply_edit(model, book, batch, 0, st)
  assert float(jnp.abs(book.lora_b[1]).max()) > 0  # trained
  assert float(jnp.abs(book.values).max()) == 0  # values unused in LoRA mode
  assert float(info.loss_last) < float(info.loss_first)


# Where the edit takes the fast path (adds the edited output after the wrapped layer): the modules
# that are their layer's last residual addition, as each architecture computes its layer.
FAST_PATH = {
    "llama": {"model.layers.1.mlp.down_proj"},
    "mistral": {"model.layers.1.mlp.down_proj"},
    "qwen2": {"model.layers.1.mlp.down_proj"},
    "qwen3": {"model.layers.1.mlp.down_proj"},
    "gpt2": {"transformer.h.1.mlp.c_proj"},
    "gptj": {"transformer.h.1.mlp.fc_out", "transformer.h.1.attn.out_proj"},
    "gpt_oss": set(),  # o_proj feeds the layer's MoE
}


@pytest.mark.parametrize("model_type", sorted(FAST_PATH))
def test_fast_path_exactly_for_residual_writers(model_type):
  cfg = tiny_llama_config(model_type=model_type, num_layers=2)
  model = Model({}, cfg)  # writes_residual reads only the config
  layer_1 = [n for n in module_names(cfg) if ".1." in n]
  assert {n for n in layer_1 if edit.writes_residual(model, n)} == FAST_PATH[model_type]


def random_edits(n, seed=0):
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(1, 128, rng.integers(3, 10))) for _ in range(n)]
  targets = [list(rng.integers(1, 128, rng.integers(1, 4))) for _ in range(n)]
  return make_batch(prompts, targets)


def test_no_recompilation_within_a_bucket():
  model = random_model(tiny_llama_config(num_layers=2), seed=1)
  st = settings(layer="model.layers.1.mlp.down_proj", n_iter=2, initial_capacity=16, seed=777,
                hopfield_key_match_threshold=2.0)
  before = edit.compile_count()
  book, _ = edit.apply_edits(model, state.init(st, 128, 64), random_edits(12), st, progress=False)
  assert int(book.count) == 13 and book.capacity == 16
  assert edit.compile_count() - before == 1


@pytest.mark.slow
def test_one_compilation_per_capacity_bucket():
  # A 2-layer model compiles faster; a seed no other test uses makes a fresh cache entry.
  model = random_model(tiny_llama_config(num_layers=2), seed=1)
  st = settings(layer="model.layers.1.mlp.down_proj", n_iter=2, initial_capacity=2, seed=12345,
                hopfield_key_match_threshold=2.0)  # every edit adds a key
  batch = random_edits(50)
  before = edit.compile_count()
  book = state.init(st, 128, 64)
  infos, buckets = [], set()
  for i in range(50):  # one edit at a time: the codebook doubles when full
    # A program per (capacity after growing, label window width): the window is the power of two
    # holding the positions from the last prompt token to the last label.
    width = edit._n_label(batch.labels[i:i + 1], batch.prompt_len[i:i + 1])
    buckets.add((state.planned_capacity(int(book.count) + 1, book.capacity), width))
    book, info = edit.apply_edit(model, book, batch, i, st)
    infos.append(bool(info.added))
  assert int(book.count) == 51 and book.capacity == 64
  # Capacities 2, 4, 8, 16, 32, 64 times the label widths met: not one program per edit.
  assert {c for c, _ in buckets} == {2, 4, 8, 16, 32, 64}
  assert edit.compile_count() - before == len(buckets) < 50
  assert all(infos)
  # Knowing the number of edits up front, apply_edits grows once: one program for all fifty.
  before = edit.compile_count()
  book, infos = edit.apply_edits(model, state.init(st, 128, 64), batch, st, progress=False,
                                 block=1)
  assert int(book.count) == 51 and book.capacity == 64
  # Capacity 64, block 1, the widest label window of the fifty: at most one new program (the
  # call passes host arrays where apply_edit passes device arrays, which jit may key apart).
  assert edit.compile_count() - before <= 1
  assert all(x["added"] for x in infos)


def test_traced_floats_do_not_recompile(model):
  """Changing a RetrievalHyper value (threshold, learning rate, ...) reuses the compiled edit and
  scoring programs, and the new value is used: a threshold above every score adds a new key."""
  from horse_jax.editors.codebook import infer
  from horse_jax.editors.codebook.settings import RetrievalHyper, hyper_of
  # A seed no other test of this module uses, so the programs below are compiled here.
  base = settings(seed=424242, n_iter=2, hopfield_key_match_threshold=-1.0)
  batch = make_batch([[5, 9, 17, 33, 2], [5, 9, 17, 33, 2]], [[40], [40]])
  assert tuple(hyper_of(base)) == (base.edit_lr, base.hopfield_retrieval_alpha,
                                   base.hopfield_retrieval_beta, base.hopfield_retrieval_eps,
                                   base.hopfield_key_match_threshold, base.lora_scale, base.grace_eps)
  assert RetrievalHyper._fields[4] == "hopfield_key_match_threshold"

  def run(st):
    book = state.init(st, 128, 64)
    book, first = edit.apply_edit(model, book, batch, 0, st)
    book, second = edit.apply_edit(model, book, batch, 1, st)
    logits = infer.edited_logits(model, book, jnp.asarray(batch.input_ids),
                                 jnp.asarray(batch.attention_mask), jnp.asarray(batch.prompt_len),
                                 settings=st)
    return int(book.count), np.asarray(logits)

  count, _ = run(base)
  assert count == 2  # same prompt and label, every score above -1: the key is reused
  edits, scores = edit.compile_count(), infer._edited_logits._cache_size()
  strict = dataclasses.replace(base, hopfield_key_match_threshold=2.0, edit_lr=0.5,
                               hopfield_retrieval_beta=7.0)
  count, _ = run(strict)
  assert count == 3  # no score exceeds 2: the second edit adds its own key
  assert edit.compile_count() == edits and infer._edited_logits._cache_size() == scores
  run(dataclasses.replace(base, n_iter=3))  # a static setting: one new edit program
  assert edit.compile_count() == edits + 1
