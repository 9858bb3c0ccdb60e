"""Keys and value gradients of the edited modules for N edits (step 1 of HORSE/MALMEN).

For each LM mini-batch (`data.batch_size` edits, longest first) one jitted call runs the forward from
the lowest edited layer (the residual stream below it is edit-invariant: `hidden_before`), captures
each edited module's input (keys) and differentiates the token-mean CE with respect to a zero offset
on each module's output (value gradients). Rows at the chosen token positions (`token: ans`: labels
!= -100; `token: all`: attended positions) are gathered into a fixed bucket of rows (padding rows are
zero with valid = 0) and the shape's normalizer is updated with concat(keys, grads), module by
module in config order, as the reference does.

Memory: only compacted rows are kept, [R, d_k] + [R, d_v] float32 per module. At reference scale
(8000 ZsRE edits, ~3 answer tokens each, d_k = 11008, d_v = 4096) that is ~24k rows, ~1.4 GB per
module, ~8.5 GB for 6 modules; the LM activations of one mini-batch are freed after each call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.data.tokenize import IGNORE, EditBatch, bucket_length
from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.models import Hooks, Model, forward_from, hidden_before


class Cache(NamedTuple):
  """Per-module rows for one set of edits (all modules share the row layout).

  Attributes:
    keys: name -> [R, d_k] float32 (zero on padding rows).
    grads: name -> [R, d_v] float32 value gradients (zero on padding rows).
    valid: [R] float32, 1 on real rows.
  """

  keys: dict
  grads: dict
  valid: jax.Array


def token_mask(batch: EditBatch, token: str) -> np.ndarray:
  """[B, T] bool: the positions whose keys/value grads are used."""
  if token == "ans":
    return np.asarray(batch.labels) != IGNORE
  if token == "all":
    return np.asarray(batch.attention_mask) != 0
  raise ValueError(f"token must be 'ans' or 'all', not {token!r}")


def token_ce(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Token-mean cross-entropy over positions with label != -100 (labels aligned with logits)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  use = labels_BxT != IGNORE
  safe = jnp.where(use, labels_BxT, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(use, nll, 0.0)) / jnp.maximum(jnp.sum(use), 1)


@functools.partial(jax.jit, static_argnames=("modules", "shapes"))
def cache_batch(model: Model, norms: dict, modules: tuple, shapes: tuple, input_ids, attention_mask,
                labels, rows_R, valid_R):
  """Keys/value grads of one mini-batch at flat positions `rows_R`, and the updated normalizers.

  Args:
    model: the (unedited) LM.
    norms: shape key -> NormState.
    modules: edited module names, config order (static, so every method shares one compile).
    shapes: (d_k, d_v) per module.
    input_ids, attention_mask, labels: [B, T] mini-batch.
    rows_R: flat indices into B*T of the used positions, padded with 0.
    valid_R: 1 for real entries of rows_R.

  Returns:
    (keys {name: [R, d_k]}, grads {name: [R, d_v]}, norms).
  """
  b, t = input_ids.shape
  cfg = HypernetConfig(method="malmen", modules=modules, shapes=shapes)  # for its derived fields
  low = cfg.lowest_layer
  h = hidden_before(model, low, input_ids, attention_mask)
  zeros = {n: jnp.zeros((b, t, dv), jnp.float32) for n, (_, dv) in zip(cfg.modules, cfg.shapes)}

  def loss_fn(offsets):
    out = forward_from(model, low, h, attention_mask, hooks=Hooks(capture=cfg.modules, offsets=offsets))
    return token_ce(out.logits, labels), out.captured

  grads, captured = jax.grad(loss_fn, has_aux=True)(zeros)
  v = valid_R.astype(jnp.float32)[:, None]
  keys_out, grads_out = {}, {}
  norms = dict(norms)
  for name, (dk, dv), skey in zip(cfg.modules, cfg.shapes, cfg.shape_keys):
    k = captured[name].reshape(b * t, dk).astype(jnp.float32)[rows_R] * v
    g = grads[name].reshape(b * t, dv).astype(jnp.float32)[rows_R] * v
    keys_out[name], grads_out[name] = k, g
    norms[skey] = normalizer.update(norms[skey], jnp.concatenate([k, g], axis=-1), valid_R)
  return keys_out, grads_out, norms


def padded_rows(n_rows: int, chunk: int) -> tuple[int, int]:
  """(total rows, chunk) for n_rows: a power-of-two bucket below one chunk, else whole chunks."""
  if n_rows <= chunk:
    total = bucket_length(n_rows, minimum=8)
    return total, total
  return -(-n_rows // chunk) * chunk, chunk


def build_cache(model: Model, norms: dict, cfg: HypernetConfig, batches: Sequence[EditBatch],
                progress: bool = False) -> tuple[Cache, dict, int]:
  """Caches every mini-batch and concatenates the rows.

  Args:
    model: the LM.
    norms: shape key -> NormState (updated and returned).
    cfg: editor config.
    batches: LM mini-batches of the edits (see `data.edit_batches`).
    progress: show a tqdm bar.

  Returns:
    (Cache with R rows padded per `padded_rows`, updated norms, chunk to use).
  """
  keys = {n: [] for n in cfg.modules}
  grads = {n: [] for n in cfg.modules}
  valid = []
  it = batches
  if progress:
    from tqdm import tqdm
    it = tqdm(batches, desc="cache", leave=False)
  for batch in it:
    flat = np.nonzero(token_mask(batch, cfg.token).reshape(-1))[0]
    size = bucket_length(len(flat), minimum=8)
    rows = np.zeros((size,), np.int32)
    rows[:len(flat)] = flat
    ok = np.zeros((size,), np.float32)
    ok[:len(flat)] = 1.0
    k, g, norms = cache_batch(model, norms, cfg.modules, cfg.shapes, jnp.asarray(batch.input_ids),
                              jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels),
                              jnp.asarray(rows), jnp.asarray(ok))
    for n in cfg.modules:
      keys[n].append(k[n])
      grads[n].append(g[n])
    valid.append(ok)
  # Drop the per-batch bucket padding: keep real rows only, then pad once to the chunked total.
  all_valid = np.concatenate(valid)
  real = np.nonzero(all_valid)[0]
  total, chunk = padded_rows(len(real), cfg.chunk)
  take = np.zeros((total,), np.int32)
  take[:len(real)] = real
  ok = np.zeros((total,), np.float32)
  ok[:len(real)] = 1.0
  take_j, ok_j = jnp.asarray(take), jnp.asarray(ok)

  def cat(parts):
    return jnp.concatenate(parts, axis=0)[take_j] * ok_j[:, None]

  cache = Cache({n: cat(keys[n]) for n in cfg.modules}, {n: cat(grads[n]) for n in cfg.modules}, ok_j)
  return cache, norms, chunk
