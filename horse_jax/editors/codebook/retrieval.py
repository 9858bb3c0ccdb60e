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
from horse_jax.editors.precision import exact

TIE = 1e-5  # relative score margin within which the earlier row wins (module docstring)


def tie_floor(best: jax.Array) -> jax.Array:
  """The lowest score that ties with `best`: rows at or above it count as the best one."""
  return best - TIE * jnp.maximum(1.0, jnp.abs(best))


class Retrieval(NamedTuple):
  index: jax.Array  # [] int32, j*
  score: jax.Array  # [] float32, s[j*]
  match: jax.Array  # [] bool, s[j*] > threshold
  scores: jax.Array  # [C] float32 (-inf beyond count)
  xi: jax.Array  # [d_in] refined query


@exact  # scores meet a threshold and beta-scaled softmaxes: float32 products
def retrieve(q: jax.Array, keys_CxD: jax.Array, count: jax.Array, *, alpha: float, beta: float,
             eps: float, max_iter: int, threshold: float, normalize: bool) -> Retrieval:
  """Retrieval for one query q [d_in] (vmap it over queries)."""
  live = jnp.arange(keys_CxD.shape[0]) < count
  keys = keys_CxD.astype(jnp.float32)
  norm = l2_normalize if normalize else (lambda x: x)

  def step(_, carry):
    xi, done = carry
    logits = jnp.where(live, beta * (keys @ xi), -jnp.inf)
    r = norm(jax.nn.softmax(logits) @ keys)
    done = done | (jnp.linalg.norm(r - xi) < eps)
    xi = jnp.where(done, xi, norm((1.0 - alpha) * xi + alpha * r))
    return xi, done

  xi, _ = jax.lax.fori_loop(0, max_iter, step, (q.astype(jnp.float32), jnp.asarray(False)))
  scores = jnp.where(live, keys @ xi, -jnp.inf)
  index = jnp.argmax(scores >= tie_floor(jnp.max(scores))).astype(jnp.int32)
  score = scores[index]
  return Retrieval(index, score, score > threshold, scores, xi)


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
                  chunk: int = 1024) -> Retrieval:
  """`retrieve` that reads only the live rows: cost grows with `count`, not with the capacity.

  The rows are visited in chunks of `chunk` up to `count` (a dynamic loop), with the softmax
  accumulated online (running max, rescaled sums); the final scores are written into a [C]
  vector (-inf beyond count) and the first row tied with the best is taken, as `retrieve` does. Mathematically `retrieve`; floats differ by the summation order
  (~1e-7). The editor decides with it so that a codebook preallocated for a long run does not make
  every early edit pay for the empty rows.
  """
  cap, d = keys_CxD.shape
  chunk = min(int(chunk), cap)
  n_chunks = (count + chunk - 1) // chunk
  norm = l2_normalize if normalize else (lambda x: x)

  def rows_of(i):
    start = jnp.minimum(i * chunk, cap - chunk)  # the last chunk may overlap: mask rows seen before
    rows = start + jnp.arange(chunk)
    block = jax.lax.dynamic_slice(keys_CxD, (start, 0), (chunk, d)).astype(jnp.float32)
    return block, (rows >= i * chunk) & (rows < count), rows

  def softmax_keys(xi):
    """softmax(beta * xi K^T) K over the live rows."""
    def body(i, carry):
      m, z, acc = carry
      block, ok, _ = rows_of(i)
      logits = jnp.where(ok, beta * (block @ xi), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(logits))
      e = jnp.where(ok, jnp.exp(logits - m_new), 0.0)
      scale = jnp.exp(m - m_new)
      return m_new, z * scale + jnp.sum(e), acc * scale + e @ block
    init = (jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(0.0, jnp.float32),
            jnp.zeros((d,), jnp.float32))
    _, z, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    return acc / z

  def step(_, carry):
    xi, done = carry
    r = norm(softmax_keys(xi))
    done = done | (jnp.linalg.norm(r - xi) < eps)
    xi = jnp.where(done, xi, norm((1.0 - alpha) * xi + alpha * r))
    return xi, done

  xi, _ = jax.lax.fori_loop(0, max_iter, step, (q.astype(jnp.float32), jnp.asarray(False)))

  def scores_into(i, buf):
    """Chunk i's scores written into buf ([C], -inf where not live); the keys are read once."""
    block, ok, rows = rows_of(i)
    start = rows[0]
    s = jnp.where(ok, block @ xi, jax.lax.dynamic_slice(buf, (start,), (chunk,)))
    return jax.lax.dynamic_update_slice(buf, s, (start,))

  scores = jax.lax.fori_loop(0, n_chunks, scores_into, jnp.full((cap,), -jnp.inf, jnp.float32))
  index = jnp.argmax(scores >= tie_floor(jnp.max(scores))).astype(jnp.int32)
  score = scores[index]
  return Retrieval(index, score, score > threshold, scores, xi)
