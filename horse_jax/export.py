"""Writing what a hypernetwork edit produced, in Hugging Face terms.

  deltas = hf_deltas(model, edited, modules)     {HF tensor name: float32 edited - original}
  save_edit(out, model, edited, modules, tokenizer_src=path)
      -> out/deltas.safetensors and out/model/ (a checkpoint transformers loads)
  save_codebook(folder, book, settings, extra={...})
      -> a HoReN / GRACE codebook folder (`editors.codebook.persist`)

Multi-host: every process calls these and process 0 alone writes; tensors are gathered and written
one at a time (a weight split over processes is gathered collectively), so no host ever holds the
whole model or codebook. Metrics files are `horse_jax.eval.scoring.write_metrics`.
"""

from __future__ import annotations

import os

import numpy as np

from horse_jax import distributed
from horse_jax.errors import UserError
from horse_jax.io import stream_safetensors
from horse_jax.models.hf_io import DEFAULT_MAX_SHARD_SIZE

DELTAS_FILE = "deltas.safetensors"
MODEL_FOLDER = "model"


def _delta_entries(original, modules) -> list:
  """The name-table entry of each edited module's kernel, in `modules` order.

  Raises:
    UserError: a module has no Hugging Face weight in the architecture's name table.
  """
  from horse_jax.models import hf_map
  by_path = {e.path: e for e in hf_map.entries(original.config)}
  out = []
  for name in modules:
    entry = by_path.get(f"{name}.kernel")
    if entry is None:
      raise UserError(f"module {name!r} has no Hugging Face weight in the name table")
    out.append(entry)
  return out


def _delta(original, edited, entry) -> np.ndarray:
  """float32 edited - original of one weight in HF layout (each kernel gathered alone)."""
  from horse_jax.models import hf_map
  from horse_jax.models.names import get_kernel
  module = entry.path.removesuffix(".kernel")
  delta = distributed.to_host(get_kernel(edited.params, module)).astype(np.float32)
  delta -= distributed.to_host(get_kernel(original.params, module))
  return np.asarray(delta.T if entry.kind == hf_map.LINEAR else delta, order="C")


def hf_deltas(original, edited, modules) -> dict[str, np.ndarray]:
  """float32 edited - original of each edited weight, keyed by HF tensor name, in HF layout.

  Args:
    original: the unedited Model.
    edited: the edited Model (same config).
    modules: edited module names (e.g. "model.layers.3.mlp.down_proj").

  Returns:
    {HF tensor name: contiguous float32 array}.

  Raises:
    UserError: a module has no Hugging Face weight in the architecture's name table.
  """
  return {e.hf_name: _delta(original, edited, e) for e in _delta_entries(original, modules)}


def save_edit(out: str, original, edited, modules, *, tokenizer_src: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
  """Writes out/deltas.safetensors (`hf_deltas`) and the edited checkpoint out/model/.

  Both are streamed one tensor at a time (`horse_jax.io.stream_safetensors`): the host never holds
  the whole model, nor all the deltas, at once.

  Args:
    out: output folder (created), read on process 0 only (other processes may pass None).
    original: the unedited Model.
    edited: the edited Model.
    modules: the edited module names.
    tokenizer_src: folder whose tokenizer files are copied next to the checkpoint.
    max_shard_size: the checkpoint's file size limit (`models.save_pretrained`).
  """
  from horse_jax.models import save_pretrained
  entries = _delta_entries(original, modules)
  specs = [(e.hf_name, np.float32, e.hf_shape) for e in entries]
  main = distributed.is_main()
  if main:
    os.makedirs(out, exist_ok=True)
  stream_safetensors(os.path.join(out, DELTAS_FILE) if main else None, specs,
                     lambda i: _delta(original, edited, entries[i]))
  save_pretrained(edited, os.path.join(out, MODEL_FOLDER) if main else None,
                  tokenizer_src=tokenizer_src, max_shard_size=max_shard_size)


def save_codebook(folder: str, book, settings, *, extra: dict | None = None) -> None:
  """Writes a codebook folder (`editors.codebook.persist.save`: codebook.safetensors, settings).

  Args:
    folder: the codebook folder.
    book: the codebook state.
    settings: its `CodebookSettings`.
    extra: more facts for its settings.json (e.g. the model and data it was edited with).
  """
  from horse_jax.editors.codebook import persist
  persist.save(folder, book, settings, extra=extra)
