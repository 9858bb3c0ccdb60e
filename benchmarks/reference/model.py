"""The model both sides of a reference benchmark edit: a random Llama as deep as Llama-3-8B.

The reference's hparams files name Llama-3-8B's layers (ROME 5, MEMIT/AlphaEdit 4-8 with the loss at
31, UltraEdit 11-24, WISE/DEFER/HoReN/GRACE 29), so the model has its 32 decoder layers, read as
written on both sides, at the demo world model's width (hidden 128, MLP 768, 4 heads, 2 KV heads)
and with the world's tokenizer, so the world's ZsRE records are its edits.
"""

from __future__ import annotations

import os
import shutil

# Llama-3-8B's depth at the world model's width.
CONFIG = dict(hidden_size=128, intermediate_size=768, num_hidden_layers=32, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=128,
              rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False, initializer_range=0.02)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# "llama" in the folder name: the reference decides some layouts by `model_name` (AlphaEdit's P).
FOLDER = "llama-32-layer-world-width"


def shape() -> str:
  c = CONFIG
  return (f"random Llama, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
          f"MLP {c['intermediate_size']}, vocab {c['vocab_size']}")


def build(parent: str, world_dir: str, seed: int = 0) -> str:
  """Writes the model (float32 safetensors) with the world's tokenizer under `parent`; returns its
  folder (reused when it exists)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  folder = os.path.join(parent, FOLDER)
  if os.path.isfile(os.path.join(folder, "config.json")):
    return folder
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
  model.save_pretrained(folder)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(world_dir, "model", name), os.path.join(folder, name))
  return folder
