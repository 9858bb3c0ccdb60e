"""Save/load of a codebook: identical outputs, identical continued edits, plain safetensors export;
and inference paths (right-padded scoring vs left-padded generation) agree."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from horse_jax.editors.codebook import edit, infer, persist, state
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.models.init import random_model, tiny_llama_config
from test_codebook_edit import make_batch

ST = CodebookSettings(layer="model.layers.1.mlp.down_proj", n_iter=3, initial_capacity=4,
                      hopfield_key_match_threshold=0.7)


@pytest.fixture(scope="module")
def model():
  return random_model(tiny_llama_config(num_layers=2), seed=3)


def edits():
  return make_batch([[5, 9, 17, 33, 2], [8, 8, 60, 61], [70, 71, 72, 73, 74, 75], [5, 9, 17, 33, 2]],
                    [[40, 41], [50], [60, 61, 62], [44]])


def test_save_load_identical(model, tmp_path):
  batch = edits()
  book = state.init(ST, 128, 64)
  for i in range(3):
    book, _ = edit.apply_edit(model, book, batch, i, ST)
  ids, mask, plen = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(
      batch.prompt_len)
  before = np.asarray(infer.edited_logits(model, book, ids, mask, plen, settings=ST))
  persist.save(tmp_path / "cb", book, ST, extra={"note": "x"})
  raw = load_file(str(tmp_path / "cb" / persist.SAFETENSORS))
  assert raw["keys"].shape == (4, 128) and raw["values"].shape == (4, 64)
  np.testing.assert_array_equal(raw["values"], np.asarray(book.values)[:4])

  loaded, settings = persist.load(tmp_path / "cb")
  assert settings == ST and int(loaded.count) == 4 and int(loaded.n_edits) == 3
  after = np.asarray(infer.edited_logits(model, loaded, ids, mask, plen, settings=settings))
  np.testing.assert_array_equal(after, before)
  # Edits are not a no-op here (the check above would be vacuous otherwise).
  plain = np.asarray(infer.edited_logits(model, state.init(ST, 128, 64), ids, mask, plen,
                                         settings=ST))
  assert np.abs(plain - before).max() > 1e-3

  # Continuing from the loaded copy equals continuing from the original.
  again, _ = persist.load(tmp_path / "cb")
  a, info_a = edit.apply_edit(model, loaded, batch, 3, ST)
  b, info_b = edit.apply_edit(model, again, batch, 3, ST)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  assert sorted(os.listdir(tmp_path / "cb")) == [persist.SAFETENSORS, persist.SETTINGS]

  # A folder written by earlier versions (an orbax copy of the same arrays in state/) still loads
  # from its orbax state (the safetensors file is removed here to prove which one is read).
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "cb" / persist.ORBAX), raw)
    ckptr.wait_until_finished()
  os.remove(tmp_path / "cb" / persist.SAFETENSORS)
  legacy, _ = persist.load(tmp_path / "cb")
  np.testing.assert_array_equal(np.asarray(legacy.keys)[:4], raw["keys"])  # (`again` was consumed)
  assert int(legacy.n_edits) == 3


def test_lora_codebook_roundtrip(model, tmp_path):
  st = CodebookSettings(layer="model.layers.1.mlp.down_proj", n_iter=3, initial_capacity=4,
                        adapter_mode="lora", lora_rank=2)
  batch = edits()
  book, _ = edit.apply_edit(model, state.init(st, 128, 64), batch, 0, st)
  persist.save(tmp_path / "lora", book, st)
  loaded, settings = persist.load(tmp_path / "lora")
  assert settings == st
  np.testing.assert_array_equal(np.asarray(loaded.lora_b), np.asarray(book.lora_b))


def test_generation_matches_scoring_position(model):
  """Left-padded generation (p = T - 1) edits the same prompt the same way as right-padded scoring."""
  batch = edits()
  book = state.init(ST, 128, 64)
  for i in range(3):
    book, _ = edit.apply_edit(model, book, batch, i, ST)
  prompts = [batch.input_ids[i, :batch.prompt_len[i]] for i in range(3)]
  t = 8
  left = np.zeros((3, t), np.int32)
  lmask = np.zeros((3, t), np.int32)
  for i, p in enumerate(prompts):
    left[i, t - len(p):] = p
    lmask[i, t - len(p):] = 1
  tokens = np.asarray(infer.generate_fn(model, book, ST)(left, lmask, 2))
  logits = np.asarray(infer.edited_logits(model, book, jnp.asarray(batch.input_ids[:3]),
                                          jnp.asarray(batch.attention_mask[:3]),
                                          jnp.asarray(batch.prompt_len[:3]), settings=ST))
  first = logits[np.arange(3), batch.prompt_len[:3] - 1].argmax(-1)
  np.testing.assert_array_equal(tokens[:, 0], first)
