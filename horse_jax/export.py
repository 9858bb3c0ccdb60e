"""Writing what a hypernetwork edit produced, in Hugging Face terms.

  deltas = hf_deltas(model, edited, modules)     {HF tensor name: float32 edited - original}
  save_edit(out, model, edited, modules, tokenizer_src=path)
      -> out/deltas.safetensors and out/model/ (a checkpoint transformers loads)
  save_codebook(folder, book, settings, extra={...})
      -> a HoReN / GRACE codebook folder (`editors.codebook.persist`)

Multi-host: every process calls these (sharded arrays are gathered collectively) and process 0
alone writes. Metrics files are `horse_jax.eval.scoring.write_metrics`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from horse_jax import distributed
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_bytes

DELTAS_FILE = "deltas.safetensors"
MODEL_FOLDER = "model"


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
  from horse_jax.models import hf_map
  from horse_jax.models.names import get_kernel
  by_path = {e.path: e for e in hf_map.entries(original.config)}
  out = {}
  for name in modules:
    entry = by_path.get(f"{name}.kernel")
    if entry is None:
      raise UserError(f"module {name!r} has no Hugging Face weight in the name table")
    delta = (distributed.to_host(get_kernel(edited.params, name)).astype(np.float32)
             - distributed.to_host(get_kernel(original.params, name)).astype(np.float32))
    out[entry.hf_name] = np.ascontiguousarray(delta.T if entry.kind == hf_map.LINEAR else delta)
  return out


def save_edit(out: str, original, edited, modules, *, tokenizer_src: str | None = None) -> dict:
  """Writes out/deltas.safetensors (`hf_deltas`) and the edited checkpoint out/model/.

  Args:
    out: output folder (created).
    original: the unedited Model.
    edited: the edited Model.
    modules: the edited module names.
    tokenizer_src: folder whose tokenizer files are copied next to the checkpoint.

  Returns:
    The deltas (every process gets them).
  """
  import safetensors.numpy
  from horse_jax.models import save_pretrained
  deltas = hf_deltas(original, edited, modules)
  if jax.process_count() > 1:  # gather on every process (a collective), then process 0 writes
    edited = edited.__class__(distributed.tree_to_host(edited.params), edited.config)
  if distributed.is_main():
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(os.path.join(out, DELTAS_FILE), safetensors.numpy.save(deltas))
    save_pretrained(edited, os.path.join(out, MODEL_FOLDER), tokenizer_src=tokenizer_src)
  return deltas


def save_codebook(folder: str, book, settings, *, extra: dict | None = None) -> None:
  """Writes a codebook folder (`editors.codebook.persist.save`: orbax state, safetensors, settings).

  Args:
    folder: the codebook folder.
    book: the codebook state.
    settings: its `CodebookSettings`.
    extra: more facts for its settings.json (e.g. the model and data it was edited with).
  """
  from horse_jax.editors.codebook import persist
  if jax.process_count() > 1:  # gather on every process (a collective), then process 0 writes
    book = distributed.tree_to_host(book)
  if distributed.is_main():
    persist.save(folder, book, settings, extra=extra)
