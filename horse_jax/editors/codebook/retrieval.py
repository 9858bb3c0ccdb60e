"""Damped Hopfield retrieval over the live codebook rows (the HoReN reference's retrieval).

  xi = q
  repeat max_iter times:
    pi = softmax(beta * xi K^T);  r = normalize(pi K)
    stop if ||r - xi|| < eps
    xi = normalize((1 - alpha) xi + alpha r)
  s = xi K^T;  j* = argmax s;  match = s[j*] > threshold (strict)

Ties: j* is the *first* row whose score is within a relative 1e-5 (`TIE`) of the best one, not
only the first exact maximum. Editing the same prompt again with a new target appends a copy of
its key, and the reference's argmax then returns the earlier row; computed on other devices (a mesh,
another host, a block of edits) the two copies can differ by float rounding (~1e-7), which would
let rounding pick the row. The margin makes the earlier row win wherever the scores were computed;
any two scores it merges differ by float noise only.

Rows >= count are masked with -inf. Without normalization the two `normalize` steps are skipped and
s is the raw dot product. The reference stops when the largest ||r - xi|| of the query *batch* is
below eps; here each query stops on its own (vmapped), so a result never depends on which other
prompts share its batch. A query that has converged moves by less than alpha * eps, so the two
agree to that tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook.query import l2_normalize
from horse_jax.editors.codebook.shards import Rows
from horse_jax.editors.precision import HIGHEST, exact

TIE = 1e-5  # relative score margin within which the earlier row wins (module docstring)


def tie_floor(best: jax.Array) -> jax.Array:
  """The lowest score that ties with `best`: rows at or above it count as the best one."""
  return best - TIE * jnp.maximum(1.0, jnp.abs(best))


class Retrieval(NamedTuple):
  index: jax.Array  # [] int32, j* (a global row)
  score: jax.Array  # [] float32, s[j*]
  match: jax.Array  # [] bool, s[j*] > threshold
  scores: jax.Array  # [C] float32 (-inf beyond count): the function's rows (one device's on a mesh)
  xi: jax.Array  # [d_in] refined query


def _best(scores_C: jax.Array, rows: Rows, threshold) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(j*, s[j*], match): the first global row tied with the best score (`tie_floor`)."""
  index = rows.first(scores_C >= tie_floor(rows.max(jnp.max(scores_C))))
  score = rows.take(scores_C, index)
  return index, score, score > threshold


@exact  # scores meet a threshold and beta-scaled softmaxes: float32 products
def retrieve(q: jax.Array, keys_CxD: jax.Array, count: jax.Array, *, alpha: float, beta: float,
             eps: float, max_iter: int, threshold: float, normalize: bool,
             rows: Rows = Rows()) -> Retrieval:
  """Retrieval for one query q [d_in] (vmap it over queries).

  `keys_CxD` are the rows `rows` describes: the whole codebook, or one device's rows inside
  `shards.on_rows` (the softmax max and sums and the best row are then reduced over the devices).
  """
  live = rows.index(keys_CxD.shape[0]) < count
  keys = keys_CxD.astype(jnp.float32)
  norm = l2_normalize if normalize else (lambda x: x)

  def step(_, carry):
    xi, done = carry
    logits = jnp.where(live, beta * jnp.matmul(keys, xi, precision=HIGHEST), -jnp.inf)
    # softmax(logits) K with the max and the normaliser taken over every device's rows.
    e = jnp.exp(logits - rows.max(jnp.max(logits)))
    weights = e / rows.sum(jnp.sum(e))
    r = norm(rows.sum(jnp.matmul(weights, keys, precision=HIGHEST)))
    done = done | (jnp.linalg.norm(r - xi) < eps)
    xi = jnp.where(done, xi, norm((1.0 - alpha) * xi + alpha * r))
    return xi, done

  xi, _ = jax.lax.fori_loop(0, max_iter, step, (q.astype(jnp.float32), jnp.asarray(False)))
  scores = jnp.where(live, jnp.matmul(keys, xi, precision=HIGHEST), -jnp.inf)
  return Retrieval(*_best(scores, rows, threshold), scores, xi)


def retrieve_batch(q_BxD: jax.Array, keys_CxD: jax.Array, count: jax.Array, **kwargs) -> Retrieval:
  """`retrieve` vmapped over queries [B, d_in]."""
  return jax.vmap(lambda q: retrieve(q, keys_CxD, count, **kwargs))(q_BxD)


def settings_kwargs(settings, hyper) -> dict:
  """The retrieval keyword arguments of a CodebookSettings (static) and its RetrievalHyper (traced)."""
  return dict(alpha=hyper.hopfield_retrieval_alpha, beta=hyper.hopfield_retrieval_beta,
              eps=hyper.hopfield_retrieval_eps, max_iter=settings.hopfield_retrieval_max_iter,
              threshold=hyper.hopfield_key_match_threshold, normalize=settings.normalize_codebook_keys)


@exact
def retrieve_live(q: jax.Array, keys_CxD: jax.Array, count: jax.Array, *, alpha: float, beta: float,
                  eps: float, max_iter: int, threshold: float, normalize: bool,
                  chunk: int = 1024, rows: Rows = Rows()) -> Retrieval:
  """`retrieve` that reads only the live rows: cost grows with `count`, not with the capacity.

  The rows are visited in chunks of `chunk` up to `count` (a dynamic loop), with the softmax
  accumulated online (running max, rescaled sums); the final scores are written into a [C]
  vector (-inf beyond count) and the first row tied with the best is taken, as `retrieve` does.
  Mathematically `retrieve`; floats differ by the summation order (~1e-7). The editor decides with
  it so that a codebook preallocated for a long run does not make every early edit pay for the
  empty rows. On a mesh (`rows`) each device runs the loop over its own live rows and the online
  partials (max, sum, weighted keys) are combined across devices once per Hopfield step.
  """
  cap, d = keys_CxD.shape
  chunk = min(int(chunk), cap)
  local = jnp.clip(count - rows.start(cap), 0, cap)  # this device's live rows
  n_chunks = (local + chunk - 1) // chunk
  norm = l2_normalize if normalize else (lambda x: x)

  def rows_of(i):
    start = jnp.minimum(i * chunk, cap - chunk)  # the last chunk may overlap: mask rows seen before
    idx = start + jnp.arange(chunk)
    block = jax.lax.dynamic_slice(keys_CxD, (start, 0), (chunk, d)).astype(jnp.float32)
    return block, (idx >= i * chunk) & (idx < local), idx

  def softmax_keys(xi):
    """softmax(beta * xi K^T) K over the live rows."""
    def body(i, carry):
      m, z, acc = carry
      block, ok, _ = rows_of(i)
      logits = jnp.where(ok, beta * jnp.matmul(block, xi, precision=HIGHEST), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(logits))
      e = jnp.where(ok, jnp.exp(logits - m_new), 0.0)
      scale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_new), 0.0)
      return m_new, z * scale + jnp.sum(e), acc * scale + jnp.matmul(e, block, precision=HIGHEST)
    init = (jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(0.0, jnp.float32),
            jnp.zeros((d,), jnp.float32))
    m, z, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    # Each device's partials rescaled to the common max (a device without live rows adds 0).
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m - rows.max(m)), 0.0)
    return rows.sum(acc * scale) / rows.sum(z * scale)

  def step(_, carry):
    xi, done = carry
    r = norm(softmax_keys(xi))
    done = done | (jnp.linalg.norm(r - xi) < eps)
    xi = jnp.where(done, xi, norm((1.0 - alpha) * xi + alpha * r))
    return xi, done

  xi, _ = jax.lax.fori_loop(0, max_iter, step, (q.astype(jnp.float32), jnp.asarray(False)))

  def scores_into(i, buf):
    """Chunk i's scores written into buf ([C], -inf where not live); the keys are read once."""
    block, ok, idx = rows_of(i)
    start = idx[0]
    s = jnp.where(ok, jnp.matmul(block, xi, precision=HIGHEST),
                  jax.lax.dynamic_slice(buf, (start,), (chunk,)))
    return jax.lax.dynamic_update_slice(buf, s, (start,))

  scores = jax.lax.fori_loop(0, n_chunks, scores_into, jnp.full((cap,), -jnp.inf, jnp.float32))
  return Retrieval(*_best(scores, rows, threshold), scores, xi)


class Found(NamedTuple):
  """What inference needs of a batch of retrievals (`retrieve_found`)."""
  index: jax.Array  # [B] int32, j* (a global row)
  score: jax.Array  # [B] float32, s[j*]
  match: jax.Array  # [B] bool, s[j*] > threshold


# Relative margin below the best candidate score within which a row outside the candidates forces the
# full final pass: ten times the tie margin, far above float32 rounding of the scores (~1e-7).
CANDIDATE_MARGIN = 10 * TIE


@exact
def retrieve_found(q_BxD: jax.Array, keys_CxD: jax.Array, count: jax.Array, *, alpha: float,
                   beta: float, eps: float, max_iter: int, threshold: float, normalize: bool,
                   rows: Rows = Rows(), candidates: int = 32) -> Found:
  """`retrieve` of a batch of queries (j*, s[j*], match), with the final score pass on candidates.

  The Hopfield steps run as batched products over the rows ([B, C] logits, [B, d] weighted key
  sums). The final scores s_j = k_j . xi need not be a third full product: the last step's
  xi = c1 xi' + c2 r (c1, c2 >= 0 from the damping and the normalization; c1 = 1, c2 = 0 for a
  query that stopped) with xi' the query whose scores t_j = k_j . xi' that step already computed,
  so s_j <= c1 t_j + c2 |k_j| |r| (Cauchy-Schwarz). The `candidates` rows with the highest bound
  get exact scores; every other row's bound is below the best candidate's exact score minus
  `CANDIDATE_MARGIN` (relative) in the usual case, so it can neither be j* nor tie with it, and the
  result is `retrieve`'s (floats up to summation order). When that fails for any query of the
  batch (on any device), the batch takes the full final product instead.

  Args:
    q_BxD: queries.
    keys_CxD, count, alpha, beta, eps, max_iter, threshold, normalize, rows: as in `retrieve`.
    candidates: rows per query (per device on a mesh) scored exactly in the final pass.

  Returns:
    Found with [B] fields.
  """
  c_rows, _ = keys_CxD.shape
  live = rows.index(c_rows) < count  # [C]
  keys = keys_CxD.astype(jnp.float32)
  q = q_BxD.astype(jnp.float32)
  norm = l2_normalize if normalize else (lambda x: x)

  def dots(x_BxD):
    return jnp.where(live[None, :], jnp.matmul(x_BxD, keys.T, precision=HIGHEST), -jnp.inf)

  def step(_, carry):
    xi, done, _, _, _, _ = carry
    t = dots(xi)  # scores of the current xi: the final scores' bound if this is the last step
    logits = beta * t
    e = jnp.exp(logits - rows.max(jnp.max(logits, axis=1, keepdims=True)))
    weights = e / rows.sum(jnp.sum(e, axis=1, keepdims=True))
    r = norm(rows.sum(jnp.matmul(weights, keys, precision=HIGHEST)))
    done = done | (jnp.linalg.norm(r - xi, axis=1) < eps)
    mixed = (1.0 - alpha) * xi + alpha * r
    scale = (1.0 / jnp.linalg.norm(mixed, axis=1)) if normalize else jnp.ones(q.shape[:1])
    c1 = jnp.where(done, 1.0, (1.0 - alpha) * scale)
    c2 = jnp.where(done, 0.0, alpha * scale)
    new = jnp.where(done[:, None], xi, norm(mixed))
    return new, done, t, c1, c2, jnp.linalg.norm(r, axis=1)

  b = q.shape[0]
  zeros = jnp.zeros((b,), jnp.float32)
  if max_iter == 0:
    t, c1, c2, r_norm, xi = dots(q), zeros + 1.0, zeros, zeros, q
  else:
    init = (q, jnp.zeros((b,), bool), jnp.zeros((b, c_rows), jnp.float32), zeros, zeros, zeros)
    xi, _, t, c1, c2, r_norm = jax.lax.fori_loop(0, max_iter, step, init)
  k_norm = jnp.linalg.norm(keys, axis=1)  # [C]
  bound = jnp.where(live[None, :], c1[:, None] * t + (c2 * r_norm)[:, None] * k_norm[None, :],
                    -jnp.inf)
  k = min(int(candidates), c_rows)
  # The bounds are read back by index: consuming top_k's values output makes XLA:CPU sort whole rows.
  top = jax.lax.top_k(bound, k)[1]  # [B, k]
  top_bound = jnp.take_along_axis(bound, top, axis=1)
  exact_k = jnp.where(jnp.isfinite(top_bound),
                      jnp.einsum("bkd,bd->bk", keys[top], xi, precision=HIGHEST), -jnp.inf)
  best = rows.max(jnp.max(exact_k, axis=1))  # [B]: the best candidate over every device
  # The rows beyond the k-th candidate have bounds <= its bound; outside the margin they lose.
  left_out = top_bound[:, -1] >= best - CANDIDATE_MARGIN * jnp.maximum(1.0, jnp.abs(best))
  # The bound needs c1 >= 0 (alpha <= 1); a larger alpha takes the full product.
  left_out = (left_out & jnp.isfinite(top_bound[:, -1])) | (c1 < 0)
  full = rows.max(jnp.any(left_out).astype(jnp.int32)) > 0

  def candidate_scores():
    # Exact scores at the candidate rows, -inf elsewhere: `_best` then sees what `retrieve` sees
    # near the top (every row that can be or tie with j*).
    buf = jnp.full((b, c_rows), -jnp.inf, jnp.float32)
    return buf.at[jnp.arange(b)[:, None], top].set(exact_k)

  scores = jax.lax.cond(full, lambda: dots(xi), candidate_scores)
  index, score, match = jax.vmap(lambda s: _best(s, rows, threshold))(scores)
  return Found(index, score, match)
