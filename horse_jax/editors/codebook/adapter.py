"""The hook that applies a codebook to the wrapped module: `fn(x_in, y_out) -> y_out`.

Only the output at the edit position p of each sequence changes:
  HoReN value mode  y[p] += match * value[j*]
  HoReN LoRA mode   y[p] += lora_scale * match * B_j (A_j y[p])
  GRACE             y[p]  = value[j] if match else y[p]
The query comes from the module's own input x_in, so the same hook serves scoring (right-padded
batches, p = prompt_len - 1) and generation prefill (left-padded prompts, p = T - 1, `start` = first
real token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook import grace
from horse_jax.editors.codebook.query import make_query
from horse_jax.editors.codebook.retrieval import retrieve_found, settings_kwargs
from horse_jax.editors.codebook.settings import CodebookSettings, RetrievalHyper, hyper_of
from horse_jax.editors.codebook.shards import Rows, on_rows
from horse_jax.editors.codebook.state import Codebook
from horse_jax.editors.precision import exact


def entries(rows: Rows, book: Codebook, settings: CodebookSettings, q_BxD: jax.Array,
            hyper: RetrievalHyper):
  """(match [B], value [B, d_out], lora_a [B, r, d_out], lora_b [B, d_out, r]): each query's
  retrieved entry, read from the device that holds its row (run through `shards.on_rows`).
  HoReN retrieves the whole batch at once (`retrieve_found`: batched products, the final scores on
  candidate rows); GRACE query by query."""
  if settings.method == "grace":
    found = jax.vmap(lambda q: grace.lookup(q, book.keys, book.radius, book.count, rows))(q_BxD)
  else:
    found = retrieve_found(q_BxD, book.keys, book.count, rows=rows, **settings_kwargs(settings, hyper))
  return (found.match,) + tuple(jax.vmap(lambda j, buf=buf: rows.take(buf, j))(found.index)
                                for buf in (book.values, book.lora_a, book.lora_b))


@exact  # the LoRA entry's products are the editor's own (horse_jax.editors.precision)
def new_output(settings: CodebookSettings, y_p: jax.Array, match: jax.Array, value: jax.Array,
               lora_a: jax.Array, lora_b: jax.Array, hyper: RetrievalHyper | None = None) -> jax.Array:
  """The module output at p [d_out] after the codebook entry (value / A, B) is applied."""
  hyper = hyper_of(settings) if hyper is None else hyper
  y32 = y_p.astype(jnp.float32)
  m = match.astype(jnp.float32)
  if settings.method == "grace":
    out = jnp.where(match, value, y32)
  elif settings.adapter_mode == "lora":
    out = y32 + hyper.lora_scale * m * (lora_b @ (lora_a @ y32))
  else:
    out = y32 + m * value
  return out.astype(y_p.dtype)


def set_rows(y_BxTxD: jax.Array, p_B: jax.Array, rows_BxD: jax.Array) -> jax.Array:
  """y with y[b, p_b] = rows[b]."""
  return y_BxTxD.at[jnp.arange(y_BxTxD.shape[0]), p_B].set(rows_BxD.astype(y_BxTxD.dtype))


def put_edit(settings: CodebookSettings, y_BxTxD: jax.Array, p_B: jax.Array,
             rows_BxD: jax.Array) -> jax.Array:
  """Writes the edited rows: at p only (`edit_span=last`, the reference), or with `edit_span=onward`
  the change at p (rows - y[p]) is also added to every later position (answer tokens when scoring
  teacher-forced), like GRACE's `replace_all` applied from the prompt end on."""
  if settings.edit_span != "onward":
    return set_rows(y_BxTxD, p_B, rows_BxD)
  b_idx = jnp.arange(y_BxTxD.shape[0])
  delta_BxD = rows_BxD.astype(jnp.float32) - y_BxTxD[b_idx, p_B].astype(jnp.float32)
  after_BxT = jnp.arange(y_BxTxD.shape[1])[None, :] >= p_B[:, None]
  shift = jnp.where(after_BxT[:, :, None], delta_BxD[:, None, :], 0.0)
  return (y_BxTxD.astype(jnp.float32) + shift).astype(y_BxTxD.dtype)


def make_adapter(book: Codebook, settings: CodebookSettings, p_B: jax.Array,
                 start_B: jax.Array | None = None, hyper: RetrievalHyper | None = None, mesh=None):
  """The codebook hook for a batch (use it in `Hooks(adapters={settings.layer: fn})`).

  Args:
    book: the codebook.
    settings: editor settings.
    p_B: edit position per sequence (last prompt token).
    start_B: first real token per sequence (left padding); default 0.
    hyper: the traced floats (inside a jitted program); default `hyper_of(settings)`.
    mesh: the mesh the book's rows are split over (`state.place`): retrieval then runs on each
      device's rows (`shards.on_rows`); None: the book as one array.

  Returns:
    fn(x_in [B, T, d_in], y_out [B, T, d_out]) -> y_out.
  """
  p_B = jnp.asarray(p_B, jnp.int32)
  start_B = jnp.zeros_like(p_B) if start_B is None else jnp.asarray(start_B, jnp.int32)
  hyper = hyper_of(settings) if hyper is None else hyper

  def fn(x_in, y_out):
    q_B = jax.vmap(lambda x, p, s: make_query(x, p, s, settings.query_selection_strategy,
                                              settings.normalize_codebook_keys))(x_in, p_B, start_B)
    match, value, lora_a, lora_b = on_rows(
        lambda rows, bk, q, hy: entries(rows, bk, settings, q, hy), mesh, book, q_B, hyper,
        returns=("replicated",))
    y_p = y_out[jnp.arange(y_out.shape[0]), p_B]
    rows = jax.vmap(lambda y, m, v, a, b: new_output(settings, y, m, v, a, b, hyper))(
        y_p, match, value, lora_a, lora_b)
    return put_edit(settings, y_out, p_B, rows)

  return fn
