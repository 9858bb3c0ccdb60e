"""Test set-up: 8 forced CPU devices (so sharding is tested for real) and strict rank promotion."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One OpenBLAS thread: its workers spin against XLA's CPU thread pool in the ridge solves (see
# horse_jax/cli/main.py, which does the same for the command).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import hashlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

# Tiny configs of every supported architecture (hidden 32, 2 layers, 4 heads).
TINY_HF = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    # head_dim 16 != hidden / heads (8): Qwen3 reads head_dim explicitly.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
}


def build_tiny_hf(arch: str, folder, seed: int = 0, torch_dtype=None, **overrides):
  """Builds and saves a tiny random transformers model; returns the torch model (float32, eval).

  Every parameter (norm scales and biases included) gets extra Gaussian noise so that logits are
  O(1) and a wrong bias/norm/transposition cannot hide behind a near-zero init.
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  torch.set_num_threads(1)
  config_cls, model_cls, fields = TINY_HF[arch]
  fields = dict(fields, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
  fields.update(overrides)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  if torch_dtype is not None:
    model.to(torch_dtype).save_pretrained(str(folder))
    model.to(torch.float32)
  else:
    model.save_pretrained(str(folder))
  return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
  """Factory (arch, **config overrides) -> (torch model, checkpoint folder), cached per session."""
  cache = {}

  def make(arch: str, **overrides):
    key = hashlib.sha1(json.dumps([arch, overrides], sort_keys=True, default=str).encode()).hexdigest()
    if key not in cache:
      folder = tmp_path_factory.mktemp(f"hf-{arch}-{key[:8]}")
      cache[key] = (build_tiny_hf(arch, folder, **overrides), folder)
    return cache[key]

  return make
