"""A model ready to edit and score, as the CLI builds one: loaded onto an explicit mesh, with the
jitted functions scoring calls.

  mesh, fsdp = meshes.device_mesh("2x4", model_path=path)   # or None, False: one device
  model, tokenizer = load_model(path, dtype="bfloat16", mesh=mesh, fsdp=fsdp)
  logits = logits_fn(model)            # EditBatch -> [B, T, V] (one compile per shape)
  tokens = generate_fn(model)(input_ids, attention_mask, max_new_tokens)

The editors take the same mesh (`editors.protocol.make_editor(..., mesh=mesh)`); edited models are
written with `horse_jax.export`.
"""

from __future__ import annotations

import os
from typing import Any

from horse_jax.editors.protocol import model_generate as generate_fn
from horse_jax.editors.protocol import model_logits as logits_fn

__all__ = ["load_model", "logits_fn", "generate_fn"]


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh=None, fsdp: bool = False,
               tokenizer_path: str | os.PathLike | None = None) -> tuple[Any, Any]:
  """A Hugging Face checkpoint folder as (Model, tokenizer).

  Args:
    path: folder with config.json, the safetensors and the tokenizer files.
    dtype: weights dtype ("float32", "bfloat16", "float16" or a dtype); None: float32.
    mesh: a (data, model) mesh (`meshes.device_mesh`); each device then reads only its slices.
      None: one device.
    fsdp: with a mesh, also split the matrices over `data`.
    tokenizer_path: folder of the tokenizer; None: `path`.

  Returns:
    (model, tokenizer).

  Raises:
    UserError: the folder, its config or a tensor is missing or malformed.
  """
  from horse_jax.models import from_pretrained, load_tokenizer
  model = from_pretrained(path, dtype=dtype or "float32", mesh=mesh, fsdp=bool(fsdp and mesh is not None))
  return model, load_tokenizer(tokenizer_path or path)
