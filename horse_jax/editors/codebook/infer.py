"""Inference with a codebook: logits for scoring and the hook for generation.

Scoring batches are right-padded and edited at p = prompt_len - 1 of each prompt. Generation prompts
are left-padded, so p = T - 1 for every row and the prompt starts at the first attended slot; the
hook acts during prefill only, which keeps p fixed at the end of the prompt while decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook.adapter import make_adapter
from horse_jax.editors.codebook.settings import CodebookSettings, RetrievalHyper, hyper_of, jit_key
from horse_jax.editors.codebook.state import Codebook, fitted, mesh_of
from horse_jax.models import Hooks, Model, apply


def hooks_for(book: Codebook, settings: CodebookSettings, p_B, start_B=None,
              hyper: RetrievalHyper | None = None, mesh=None) -> Hooks:
  """Hooks that apply the codebook at position p_B (and prompt start start_B) of each row; `mesh`:
  the one its rows are split over (`make_adapter`)."""
  return Hooks(adapters={settings.layer: make_adapter(book, settings, p_B, start_B, hyper, mesh)})


def edited_logits(model: Model, book: Codebook, input_ids_BxT: jax.Array,
                  attention_mask_BxT: jax.Array, prompt_len_B: jax.Array, *,
                  settings: CodebookSettings) -> jax.Array:
  """Logits [B, T, V] of the edited model on right-padded prompts (p = prompt_len - 1).

  A codebook placed on a mesh (`state.place`, as the editors leave it) is read where its rows are:
  retrieval runs on each device's rows (`shards.on_rows`).
  """
  return _edited_logits(model, book, input_ids_BxT, attention_mask_BxT, prompt_len_B,
                        hyper_of(settings), settings=jit_key(settings), mesh=mesh_of(book))


@functools.partial(jax.jit, static_argnames=("settings", "mesh"))
def _edited_logits(model, book, input_ids_BxT, attention_mask_BxT, prompt_len_B, hyper, *,
                   settings, mesh=None):
  hooks = hooks_for(book, settings, jnp.asarray(prompt_len_B, jnp.int32) - 1, hyper=hyper,
                    mesh=mesh)
  return apply(model, input_ids_BxT, attention_mask_BxT, hooks=hooks)


def left_padded_positions(attention_mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(p_B, start_B) for left-padded prompts: p = T - 1, start = first attended slot."""
  mask = jnp.asarray(attention_mask_BxT)
  t = mask.shape[1]
  p = jnp.full((mask.shape[0],), t - 1, jnp.int32)
  start = (t - jnp.sum(mask != 0, axis=1)).astype(jnp.int32)
  return p, start


def logits_fn(model: Model, book: Codebook, settings: CodebookSettings):
  """A `post_logits_fn` for `horse_jax.eval.scoring`: EditBatch -> logits [B, T, V].

  It reads the book cut to its live rows (`state.fitted`): the same outputs, fewer products.
  """
  book = fitted(book, mesh_of(book))

  def fn(batch):
    return edited_logits(model, book, jnp.asarray(batch.input_ids),
                         jnp.asarray(batch.attention_mask), jnp.asarray(batch.prompt_len),
                         settings=settings)

  return fn


def edited_generate(model: Model, book: Codebook, input_ids_BxT: jax.Array,
                    attention_mask_BxT: jax.Array, *, settings: CodebookSettings,
                    max_new_tokens: int) -> jax.Array:
  """Greedy tokens [B, max_new_tokens] of the edited model on left-padded prompts.

  The codebook is a traced argument here (the foundation's `generate` treats adapters as static,
  compiled-in functions), so one program serves every codebook of the same capacity. A codebook
  placed on a mesh is read where its rows are, as in `edited_logits`.
  """
  return _edited_generate(model, book, input_ids_BxT, attention_mask_BxT, hyper_of(settings),
                          settings=jit_key(settings), max_new_tokens=max_new_tokens,
                          mesh=mesh_of(book))


@functools.partial(jax.jit, static_argnames=("settings", "max_new_tokens", "mesh"))
def _edited_generate(model, book, input_ids_BxT, attention_mask_BxT, hyper, *, settings,
                     max_new_tokens, mesh=None):
  from horse_jax.models.generate import generate  # the foundation's KV-cache decoder
  p, start = left_padded_positions(attention_mask_BxT)
  return generate(model, input_ids_BxT, attention_mask_BxT, max_new_tokens,
                  hooks=hooks_for(book, settings, p, start, hyper, mesh))


def generate_fn(model: Model, book: Codebook, settings: CodebookSettings):
  """A `generate_fn` for scoring: (left-padded ids, mask, max_new_tokens) -> tokens [B, N], on the
  book cut to its live rows (`state.fitted`)."""
  book = fitted(book, mesh_of(book))

  def fn(input_ids_BxT, attention_mask_BxT, max_new_tokens):
    return edited_generate(model, book, jnp.asarray(input_ids_BxT), jnp.asarray(attention_mask_BxT),
                           settings=settings, max_new_tokens=int(max_new_tokens))

  return fn
