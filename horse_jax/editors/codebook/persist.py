"""Saving and loading a codebook; "edited model = base checkpoint + codebook".

A codebook folder holds:
  codebook.safetensors   the live rows (keys, values, labels, radius, lora_a, lora_b) and count,
                         n_edits (`state.stored_specs`), plain safetensors (readable without JAX)
  settings.json          {"method", "editor": {reference-named settings}, "model": {...}}
The folder is written atomically (temp folder + rename), one array at a time: the host holds at most
one array (gathered whole, at the codebook's capacity) while saving, never the whole codebook.
Folders written before this layout also hold `state/`, an orbax copy of the same arrays, which
loading still prefers when present.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple

import numpy as np

from horse_jax import distributed
from horse_jax.editors.codebook import state as state_lib
from horse_jax.editors.codebook.settings import CodebookSettings, from_editor_dict
from horse_jax.errors import UserError
from horse_jax.io import atomic_directory, atomic_write_json, stream_safetensors

SAFETENSORS = "codebook.safetensors"
SETTINGS = "settings.json"
ORBAX = "state"  # written by earlier versions; read when present


def save(path: str | os.PathLike, book: state_lib.Codebook, settings: CodebookSettings,
         extra: dict[str, Any] | None = None) -> None:
  """Writes a codebook folder (replacing any folder already at `path`, atomically).

  In a multi-host run every process calls this (a codebook split over processes is gathered one
  array at a time, collectively) and process 0 alone writes.

  Args:
    path: the folder.
    book: the codebook (on the host, one device or a mesh).
    settings: its editor settings.
    extra: more JSON-able metadata (e.g. the base model path), stored under "extra".
  """
  specs = state_lib.stored_specs(book)
  n = specs[0][2][0]  # the live rows (keys come first)
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(atomic_directory(path)) if distributed.is_main() else None
    stream_safetensors(os.path.join(tmp, SAFETENSORS) if tmp else None, specs,
                       lambda i: state_lib.stored_array(book, specs[i][0], n))
    if tmp:
      atomic_write_json(os.path.join(tmp, SETTINGS), {
          "method": settings.method, "editor": settings.to_editor_dict(), "extra": extra or {}})


def load_settings(path: str | os.PathLike) -> tuple[CodebookSettings, dict[str, Any]]:
  """(settings, extra) of a codebook folder."""
  file = os.path.join(path, SETTINGS)
  try:
    with open(file, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{file}: not a codebook folder (settings.json missing)") from None
  except json.JSONDecodeError as err:
    raise UserError(f"{file}: not valid JSON ({err.msg})") from None
  editor = meta.get("editor", {})
  return from_editor_dict(meta.get("method", "horen"), editor, editor.get("layer")), meta.get(
      "extra", {})


def load(path: str | os.PathLike, capacity: int | None = None
         ) -> tuple[state_lib.Codebook, CodebookSettings]:
  """Reads a codebook folder.

  Args:
    path: the folder written by `save`.
    capacity: rows to preallocate (default: the next power of two above the live rows).

  Returns:
    (codebook, settings).
  """
  settings, _ = load_settings(path)
  orbax_dir = os.path.join(os.path.abspath(path), ORBAX)
  if os.path.isdir(orbax_dir):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      arrays = {k: np.asarray(v) for k, v in ckptr.restore(orbax_dir).items()}
  else:
    from safetensors.numpy import load_file
    file = os.path.join(path, SAFETENSORS)
    if not os.path.exists(file):
      raise UserError(f"{path}: codebook folder has neither {ORBAX}/ nor {SAFETENSORS}")
    arrays = load_file(file)
  return state_lib.from_arrays(arrays, capacity or settings.initial_capacity), settings


class EditedModel(NamedTuple):
  """A base model plus a codebook: what inference and generation need."""

  model: Any
  book: state_lib.Codebook
  settings: CodebookSettings

  def logits(self, input_ids_BxT, attention_mask_BxT, prompt_len_B):
    """Logits [B, T, V] of right-padded prompts, edited at p = prompt_len - 1."""
    from horse_jax.editors.codebook.infer import edited_logits
    return edited_logits(self.model, self.book, input_ids_BxT, attention_mask_BxT, prompt_len_B,
                         settings=self.settings)

  def generate(self, input_ids_BxT, attention_mask_BxT, max_new_tokens: int):
    """Greedy tokens [B, max_new_tokens] for left-padded prompts (p fixed at the prompt end)."""
    from horse_jax.editors.codebook.infer import generate_fn
    return generate_fn(self.model, self.book, self.settings)(input_ids_BxT, attention_mask_BxT,
                                                             max_new_tokens)


def load_edited_model(model_path: str | os.PathLike, codebook_path: str | os.PathLike,
                      dtype=None) -> EditedModel:
  """"Edited model = base checkpoint + codebook": loads both for inference or generation.

  Args:
    model_path: the base Hugging Face checkpoint folder (its weights are never changed).
    codebook_path: a folder written by `save`.
    dtype: LM dtype (default float32).
  """
  import jax.numpy as jnp

  from horse_jax.models import from_pretrained
  book, settings = load(codebook_path)
  model = from_pretrained(model_path, dtype=dtype or jnp.float32)
  return EditedModel(model, book, settings)
