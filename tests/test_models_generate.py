"""Greedy generation with the KV cache vs repeated full forwards and vs transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.models import Hooks, apply, forward, from_pretrained, generate
from horse_jax.models.init import random_model, tiny_llama_config


def _prompts(vocab, b=3, t=6, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (b, t))
  mask = np.ones((b, t), np.int32)
  mask[0, :3] = 0
  mask[1, :1] = 0
  ids[mask == 0] = 0
  return ids, mask


def _by_full_forwards(model, ids, mask, n):
  """Greedy decoding the slow way: a full forward over the whole sequence per new token."""
  out = []
  last_logits = jax.jit(lambda m, i, a: apply(m, i, a)[:, -1])
  for _ in range(n):
    token = np.asarray(jnp.argmax(last_logits(model, jnp.asarray(ids), jnp.asarray(mask)), -1))
    out.append(token)
    ids = np.concatenate([ids, token[:, None]], axis=1)
    mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
  return np.stack(out, axis=1)


def _sharpen(model, factor=6.0):
  """Scales kernels so greedy choices are well separated (no argmax ties from float noise)."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if "kernel" in jax.tree_util.keystr(path) or "embedding" in
      jax.tree_util.keystr(path) else x, model.params)
  return type(model)(params, model.config)


@pytest.mark.parametrize("window", [None, 3])
def test_cache_matches_full_forwards(window):
  model = _sharpen(random_model(tiny_llama_config(num_layers=2, sliding_window=window), seed=1))
  ids, mask = _prompts(model.config.vocab_size)
  new = np.asarray(generate(model, ids, mask, max_new_tokens=7))
  assert new.shape == (3, 7) and new.dtype == np.int32
  np.testing.assert_array_equal(new, _by_full_forwards(model, ids, mask, 7))


def test_eos_fills_with_pad():
  model = _sharpen(random_model(tiny_llama_config(num_layers=2), seed=1))
  ids, mask = _prompts(model.config.vocab_size)
  free = np.asarray(generate(model, ids, mask, max_new_tokens=6))
  eos = int(free[0, 2])
  stopped = np.asarray(generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos,
                                pad_token_id=-1))
  for row_free, row in zip(free, stopped):
    hits = np.flatnonzero(row_free == eos)
    end = hits[0] + 1 if hits.size else len(row)
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert (row[end:] == -1).all()


def test_prefill_hooks_change_generation_like_an_edited_prompt():
  """An offset on the prompt's last position during prefill = the same offset in a full forward."""
  model = _sharpen(random_model(tiny_llama_config(num_layers=2), seed=2))
  ids, mask = _prompts(model.config.vocab_size)
  name = "model.layers.1.mlp.down_proj"
  offset = np.zeros((3, 6, model.config.hidden_size), np.float32)
  offset[:, -1] = 3.0 * np.random.RandomState(0).randn(3, model.config.hidden_size)
  hooks = Hooks(offsets={name: jnp.asarray(offset)})
  new = np.asarray(generate(model, ids, mask, max_new_tokens=1, hooks=hooks))
  logits = forward(model, jnp.asarray(ids), jnp.asarray(mask), hooks=hooks).logits
  np.testing.assert_array_equal(new[:, 0], np.asarray(jnp.argmax(logits[:, -1], -1)))
  plain = np.asarray(generate(model, ids, mask, max_new_tokens=1))
  assert (plain != new).any()  # the hook did something


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gptj"])
def test_matches_transformers_generate(arch, tiny_hf):
  torch = pytest.importorskip("torch")
  torch_model, folder = tiny_hf(arch)
  model = from_pretrained(folder)
  ids, mask = _prompts(101)
  ours = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=8))
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(ours, ref)
