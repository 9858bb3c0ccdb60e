"""Logit parity with transformers (torch) on tiny random checkpoints of every architecture."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from horse_jax.models import apply, from_pretrained, read_config  # noqa: E402

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)

CASES = {
    "llama3-gqa-untied": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-mqa-tied-bias": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                          attention_bias=True, mlp_bias=True)),
    "llama-linear-rope-mha": ("llama", dict(num_key_value_heads=4,
                                            rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral-sliding": ("mistral", dict()),  # sliding_window 4 < sequence length 9
    "qwen2": ("qwen2", dict()),
    "qwen3-gqa-untied": ("qwen3", dict()),  # head_dim 16 != hidden / heads
    "qwen3-tied-bias": ("qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
    # Every layer windowed (max_window_layers 0); window 4 < sequence length 9.
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    "gpt2": ("gpt2", dict()),
    "gptj": ("gptj", dict()),
}


def _batch(vocab=101, b=3, t=9, seed=0):
  """Token ids [B, T] with left padding on rows 0 (4 pads) and 1 (1 pad); row 2 unpadded."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[0, :4] = 0
  mask[1, :1] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_logits_match_transformers(case, tiny_hf):
  arch, overrides = CASES[case]
  torch_model, folder = tiny_hf(arch, **overrides)
  model = from_pretrained(folder)
  ids, mask = _batch()
  # No padding.
  full = np.ones_like(mask)
  ref = _torch_logits(torch_model, ids, full)
  ours = np.asarray(apply(model, jnp.asarray(ids), attention_mask=jnp.asarray(full)))
  assert np.abs(ref).max() > 0.5  # logits are not trivially tiny
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)
  # Left padding: compare real positions only.
  ref = _torch_logits(torch_model, ids, mask)
  ours = np.asarray(apply(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)
  # Explicit position_ids (transformers' keyword) shifted by 3: torch with the same positions.
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + 3
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions)).logits.float().numpy()
  ours = np.asarray(apply(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                          position_ids=jnp.asarray(positions)))
  np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)


def test_left_padding_does_not_change_real_logits(tiny_hf):
  """A padded row's real positions equal the same tokens run unpadded (our model alone)."""
  _, folder = tiny_hf("gpt2")
  model = from_pretrained(folder)
  ids, mask = _batch()
  padded = np.asarray(apply(model, jnp.asarray(ids), jnp.asarray(mask)))
  alone = np.asarray(apply(model, jnp.asarray(ids[:1, 4:]), None))
  np.testing.assert_allclose(padded[0, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("case", ["llama3-gqa-untied", "gpt2", "gptj"])
def test_bfloat16_loads_and_runs(case, tiny_hf):
  arch, overrides = CASES[case]
  torch_model, folder = tiny_hf(arch, **overrides)
  model = from_pretrained(folder, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  ids, mask = _batch()
  logits = np.asarray(apply(model, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
  assert np.isfinite(logits).all()
  ref = _torch_logits(torch_model, ids, mask)
  real = mask.astype(bool)
  scale = np.abs(ref[real]).max()
  assert np.abs(logits - ref)[real].max() < 0.05 * scale + 0.05


def test_bfloat16_checkpoint_loads_as_float32(tiny_hf):
  import transformers
  _, folder = tiny_hf("llama", torch_dtype=torch.bfloat16)
  model = from_pretrained(folder)
  assert model.dtype == jnp.float32
  ids, mask = _batch()
  # Reloaded in float32 by transformers (its rotary buffers recomputed in float32).
  torch_model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  ref = _torch_logits(torch_model, ids, mask)
  ours = np.asarray(apply(model, jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_array_less(np.abs(ours - ref)[mask.astype(bool)].max(), 1e-4)


def _v4_form(hf: dict) -> dict:
  """transformers-4 config form: rope_theta / rope_scaling at top level, torch_dtype."""
  hf = dict(hf)
  rope = dict(hf.pop("rope_parameters"))
  hf["rope_theta"] = rope.pop("rope_theta")
  if rope.get("rope_type", "default") != "default":
    hf["rope_scaling"] = rope
  if "dtype" in hf:
    hf["torch_dtype"] = hf.pop("dtype")
  return hf


def test_config_forms_give_the_same_model(tiny_hf, tmp_path):
  _, folder = tiny_hf("llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
  hf5 = json.loads((folder / "config.json").read_text())
  assert "rope_parameters" in hf5 and "rope_theta" not in hf5  # transformers 5 wrote the v5 form
  v4 = tmp_path / "v4"
  v4.mkdir()
  (v4 / "config.json").write_text(json.dumps(_v4_form(hf5)))
  (v4 / "model.safetensors").symlink_to(folder / "model.safetensors")
  cfg5, cfg4 = read_config(folder), read_config(v4)
  assert cfg5 == cfg4
  assert cfg4.rope_theta == 500000.0 and cfg4.rope_scaling_dict["rope_type"] == "llama3"
  ids, mask = _batch()
  a = apply(from_pretrained(folder), jnp.asarray(ids), jnp.asarray(mask))
  b = apply(from_pretrained(v4), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
