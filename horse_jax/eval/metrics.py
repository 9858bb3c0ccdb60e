"""Per-row editing metrics on device (jitted; shapes static per length bucket).

Conventions: `labels_BxT` uses -100 (IGNORE) for positions that are not scored, and is aligned with
the logits (logits[:, j] predicts labels[:, j], see `horse_jax.data.tokenize`). A row with no scored
position has no defined accuracy: it comes back as NaN, never as 0/0 arithmetic (the division is
guarded), so callers either drop such rows (padding rows) or average with `nanmean`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

IGNORE = -100


def _masked_share(hits_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Share of True in `hits` over `mask` per row; NaN for rows with an empty mask."""
  count_B = jnp.sum(mask_BxT, axis=-1)
  total_B = jnp.sum(jnp.logical_and(hits_BxT, mask_BxT), axis=-1)
  share_B = total_B.astype(jnp.float32) / jnp.maximum(count_B, 1).astype(jnp.float32)
  return jnp.where(count_B > 0, share_B, jnp.nan)


@jax.jit
def token_accuracy(logits_BxTxV: ArrayLike, labels_BxT: ArrayLike) -> jax.Array:
  """Teacher-forced token accuracy (MALMEN `succ_ratios`).

  Args:
    logits_BxTxV: next-token logits.
    labels_BxT: target ids aligned with the logits, IGNORE elsewhere.

  Returns:
    [B] float32: mean over labelled positions of argmax(logits) == label (NaN if a row has none).
  """
  labels_BxT = jnp.asarray(labels_BxT)
  pred_BxT = jnp.argmax(logits_BxTxV, axis=-1)
  return _masked_share(pred_BxT == labels_BxT, labels_BxT != IGNORE)


@jax.jit
def agreement(pre_logits_BxTxV: ArrayLike, post_logits_BxTxV: ArrayLike, labels_BxT: ArrayLike) -> jax.Array:
  """Locality by agreement (EasyEdit): share of answer positions where post argmax == pre argmax.

  Args:
    pre_logits_BxTxV: logits of the unedited model.
    post_logits_BxTxV: logits of the edited model, same inputs.
    labels_BxT: only where labels != IGNORE (the answer positions) are compared.

  Returns:
    [B] float32 (NaN for rows without answer positions).
  """
  labels_BxT = jnp.asarray(labels_BxT)
  same_BxT = jnp.argmax(pre_logits_BxTxV, axis=-1) == jnp.argmax(post_logits_BxTxV, axis=-1)
  return _masked_share(same_BxT, labels_BxT != IGNORE)


@jax.jit
def agreement_with_predictions(pre_pred_BxT: ArrayLike, post_logits_BxTxV: ArrayLike,
                               labels_BxT: ArrayLike) -> jax.Array:
  """`agreement` with the pre-edit argmax given as token ids (cached once, reused across edits).

  Args:
    pre_pred_BxT: argmax of the unedited model's logits (only answer positions are read).
    post_logits_BxTxV: logits of the edited model.
    labels_BxT: answer positions are where labels != IGNORE.

  Returns:
    [B] float32 share of answer positions where argmax(post) == pre_pred (NaN without positions).
  """
  labels_BxT = jnp.asarray(labels_BxT)
  same_BxT = jnp.argmax(post_logits_BxTxV, axis=-1) == jnp.asarray(pre_pred_BxT)
  return _masked_share(same_BxT, labels_BxT != IGNORE)


@jax.jit
def answer_predictions(logits_BxTxV: ArrayLike, labels_BxT: ArrayLike) -> jax.Array:
  """argmax of the logits at answer positions, -1 elsewhere ([B, T] int32)."""
  labels_BxT = jnp.asarray(labels_BxT)
  pred_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
  return jnp.where(labels_BxT != IGNORE, pred_BxT, -1)


@jax.jit
def generation_accuracy(generated_BxN: ArrayLike, target_ids_BxN: ArrayLike, target_len_B: ArrayLike) -> jax.Array:
  """Token match of greedy generations with targets (HoReN reference).

  Args:
    generated_BxN: generated tokens (N >= every target length; extra columns are ignored).
    target_ids_BxN: target ids, right-padded with anything past `target_len`.
    target_len_B: number of target tokens per row.

  Returns:
    [B] float32: share of the first target_len tokens where generated == target (NaN if target_len 0).
  """
  generated_BxN = jnp.asarray(generated_BxN)
  target_ids_BxN = jnp.asarray(target_ids_BxN)
  n = generated_BxN.shape[1]
  if target_ids_BxN.shape[1] != n:
    raise ValueError(f"generated has {n} columns, targets {target_ids_BxN.shape[1]}")
  in_target_BxN = jnp.arange(n)[None, :] < jnp.asarray(target_len_B)[:, None]
  return _masked_share(generated_BxN == target_ids_BxN, in_target_BxN)


def overall(es: ArrayLike, gs: ArrayLike, loc: ArrayLike) -> jax.Array:
  """Overall score = mean of edit success, generalization and locality, ignoring NaN parts.

  Args:
    es, gs, loc: scalars or arrays of the same shape (NaN where a part is unavailable).

  Returns:
    Their element-wise NaN-ignoring mean (NaN only if all three are NaN).
  """
  parts = jnp.stack([jnp.asarray(es, jnp.float32), jnp.asarray(gs, jnp.float32), jnp.asarray(loc, jnp.float32)])
  valid = ~jnp.isnan(parts)
  count = jnp.sum(valid, axis=0)
  total = jnp.sum(jnp.where(valid, parts, 0.0), axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
