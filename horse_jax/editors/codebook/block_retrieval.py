"""HoReN retrievals of a block of edits against the codebook as it was before the block, in matmuls.

Sequential editing decides edit after edit: edit i retrieves (one damped Hopfield step, the default
`max_iter = 1`) over the rows live before the block *plus* the keys that earlier edits of the block
appended, and its result decides whether it appends its own key. Read one edit at a time, every
retrieval streams all N live keys from memory two to four times (a matrix-vector product per pass),
which at 50,000 keys makes the decisions, not the training, the cost of an edit.

With one Hopfield step everything an edit needs from the N pre-block keys K is linear in a few
vectors that do not depend on the other edits' decisions:
  logits        beta * K q_i                    -> S = K Q^T          [N, B]  (one matmul)
  softmax stats m_i = max, z_i = sum exp(l - m_i), a_i = sum exp(l - m_i) k  (online over chunks)
  refined query xi_i = c_q q_i + c_a a_i + sum_j c_j k_j   (k_j: keys appended earlier in the block,
                which are the unrefined queries q_j; the c's are scalars found per edit)
  final scores  K xi_i = c_q S[:, i] + c_a (K a_i) + sum_j c_j S[:, j]  -> G = K A^T  [N, B]
So the block reads the N keys three times in all (two matmul passes to build S, the stats and G),
and each edit, in order, combines the columns of [S | G] with its coefficients ([N, 2B] x [2B]) and
adds the at most B in-block keys directly. The result equals the one-at-a-time retrieval up to
float summation order (~1e-7 of a score), and ties (within `retrieval.TIE`) go to the earlier row
exactly as there. More Hopfield steps do not stay linear (the second
step's softmax needs K xi_1 for an xi_1 that depends on earlier decisions), so only `max_iter = 1`
takes this path.

On a mesh (`shards.on_rows`) each device holds C / n rows: S, G and the softmax partials of its own
live rows are computed where they are; the partials (max, sum, weighted keys: [B] and [B, d]) are
combined across devices once per block, and each edit's best pre-block row once per decision (a
max and a first index), so only per-query numbers cross devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook.query import l2_normalize
from horse_jax.editors.codebook.retrieval import Retrieval, tie_floor
from horse_jax.editors.codebook.shards import NONE, Rows
from horse_jax.editors.precision import HIGHEST, exact

CHUNK = 1024  # pre-block rows per matmul pass (cost follows the live rows, not the capacity)


class PreBlock(NamedTuple):
  """What a block's edits need from the rows live before the block.

  Attributes:
    sg_Cx2B: [S | G]: S[n, i] = k_n . q_i, G[n, i] = k_n . a_i for live rows n < count (rows beyond
      are not written and never read); the function's rows (one device's on a mesh).
    m_B, z_B, a_BxD: online-softmax stats of beta * K q_i over all live rows (max, sum, weighted
      keys; combined over the devices).
    keys_BxD: the block's queries (float32: what an appended key holds).
    count: live rows before the block among those of sg_Cx2B (this device's on a mesh).
  """

  sg_Cx2B: jax.Array
  m_B: jax.Array
  z_B: jax.Array
  a_BxD: jax.Array
  keys_BxD: jax.Array
  count: jax.Array


def _chunk_rows(keys_CxD, count, i, chunk):
  """Rows [start, start + chunk) of chunk i (the last chunk may overlap its predecessor: rows seen
  before are masked) as float32, with the mask of rows that are new and live."""
  cap, d = keys_CxD.shape
  start = jnp.minimum(i * chunk, cap - chunk)
  rows = start + jnp.arange(chunk)
  block = jax.lax.dynamic_slice(keys_CxD, (start, 0), (chunk, d)).astype(jnp.float32)
  return start, block, (rows >= i * chunk) & (rows < count), rows


@exact  # scores meet a threshold and beta-scaled softmaxes: float32 products
def prepare(keys_CxD: jax.Array, count: jax.Array, q_BxD: jax.Array, *, beta: float,
            chunk: int = CHUNK, rows: Rows = Rows()) -> PreBlock:
  """Two passes over the live pre-block rows: S and the softmax stats, then G.

  Args:
    keys_CxD: the codebook keys (capacity C).
    count: live rows before the block (>= 1: the default row).
    q_BxD: the block's queries (float32).
    beta: inverse temperature.
    chunk: rows per pass step.
    rows: where keys_CxD's rows sit (one device's inside `shards.on_rows`).

  Returns:
    PreBlock.
  """
  cap, d = keys_CxD.shape
  b = q_BxD.shape[0]
  chunk = min(int(chunk), cap)
  count = jnp.clip(count - rows.start(cap), 0, cap)  # this device's live rows
  n_chunks = (count + chunk - 1) // chunk
  q_BxD = q_BxD.astype(jnp.float32)  # codebook keys are float32: an appended key is exactly q

  def stats(i, carry):
    s_all, m, z, a = carry
    start, block, ok, _ = _chunk_rows(keys_CxD, count, i, chunk)
    s_chunk = jnp.matmul(block, q_BxD.T, precision=HIGHEST)  # [chunk, B]
    s_all = jax.lax.dynamic_update_slice(s_all, s_chunk, (start, 0))
    logits = jnp.where(ok[:, None], beta * s_chunk, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=0))
    e = jnp.where(ok[:, None], jnp.exp(logits - m_new[None]), 0.0)
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_new), 0.0)
    return s_all, m_new, z * scale + jnp.sum(e, axis=0), a * scale[:, None] + jnp.matmul(
        e.T, block, precision=HIGHEST)

  init = (jnp.zeros((cap, b), jnp.float32), jnp.full((b,), -jnp.inf, jnp.float32),
          jnp.zeros((b,), jnp.float32), jnp.zeros((b, d), jnp.float32))
  s_all, m, z, a = jax.lax.fori_loop(0, n_chunks, stats, init)
  # Each device's partials rescaled to the common max (a device without live rows adds 0).
  scale = jnp.where(jnp.isfinite(m), jnp.exp(m - rows.max(m)), 0.0)
  m, z, a = rows.max(m), rows.sum(z * scale), rows.sum(a * scale[:, None])

  def grams(i, g_all):
    start, block, _, _ = _chunk_rows(keys_CxD, count, i, chunk)
    return jax.lax.dynamic_update_slice(g_all, jnp.matmul(block, a.T, precision=HIGHEST),
                                        (start, 0))

  g_all = jax.lax.fori_loop(0, n_chunks, grams, jnp.zeros((cap, b), jnp.float32))
  sg = jnp.concatenate([s_all, g_all], axis=1)
  return PreBlock(sg, m, z, a, q_BxD, count)


@exact
def retrieve_in_block(pre: PreBlock, i: jax.Array, q: jax.Array, visible_B: jax.Array,
                      slot_B: jax.Array, *, alpha: float, beta: float, eps: float, threshold: float,
                      normalize: bool, chunk: int = CHUNK, rows: Rows = Rows()) -> Retrieval:
  """Edit i's one-step Hopfield retrieval over the pre-block rows and the visible in-block keys.

  Args:
    pre: the block's `prepare` result.
    i: the edit's position in the block.
    q: its query [d] (float32).
    visible_B: which edits of the block have appended a key this retrieval sees.
    slot_B: the codebook row of each appended key (read where visible).
    alpha, beta, eps, threshold, normalize: retrieval settings (one Hopfield step).
    chunk: rows per step of the final-score pass.
    rows: where pre.sg_Cx2B's rows sit (one device's inside `shards.on_rows`).

  Returns:
    Retrieval (index: a global row, score, match, scores: zeros [C], xi: refined query).
  """
  b = pre.keys_BxD.shape[0]
  norm = l2_normalize if normalize else (lambda x: x)
  in_logits = jnp.where(visible_B, beta * jnp.matmul(pre.keys_BxD, q, precision=HIGHEST), -jnp.inf)
  top = jnp.maximum(pre.m_B[i], jnp.max(in_logits))
  w_pre = jnp.exp(pre.m_B[i] - top)
  w_in = jnp.where(visible_B, jnp.exp(in_logits - top), 0.0)
  total = w_pre * pre.z_B[i] + jnp.sum(w_in)
  r_raw = (w_pre * pre.a_BxD[i] + jnp.matmul(w_in, pre.keys_BxD, precision=HIGHEST)) / total
  r = norm(r_raw)
  done = jnp.linalg.norm(r - q) < eps
  u = (1.0 - alpha) * q + alpha * r
  xi = jnp.where(done, q, norm(u))
  # xi = c_q q + c_r r_raw, so the pre-block scores are c_q S[:, i] + c_r (w_pre G[:, i] + S w_in) / total.
  r_scale = jnp.where(jnp.linalg.norm(r_raw) > 0, jnp.linalg.norm(r) / jnp.linalg.norm(r_raw), 1.0) \
      if normalize else 1.0
  u_scale = jnp.where(jnp.linalg.norm(u) > 0, jnp.linalg.norm(xi) / jnp.linalg.norm(u), 1.0) \
      if normalize else 1.0
  c_q = jnp.where(done, 1.0, u_scale * (1.0 - alpha))
  c_r = jnp.where(done, 0.0, u_scale * alpha * r_scale / total)
  onehot = jnp.arange(b) == i
  coef = jnp.concatenate([c_q * onehot + c_r * w_in, c_r * w_pre * onehot])  # [2B]

  cap = pre.sg_Cx2B.shape[0]
  chunk = min(int(chunk), cap)
  n_chunks = (pre.count + chunk - 1) // chunk

  def scores_of(k, buf):
    """Chunk k's pre-block scores written into buf ([C], -inf where not live), and their max."""
    start = jnp.minimum(k * chunk, cap - chunk)
    idx = start + jnp.arange(chunk)
    s = jnp.matmul(jax.lax.dynamic_slice(pre.sg_Cx2B, (start, 0), (chunk, 2 * b)), coef,
                   precision=HIGHEST)
    fresh = (idx >= k * chunk) & (idx < pre.count)  # the last chunk may overlap the one before
    s = jnp.where(fresh, s, jax.lax.dynamic_slice(buf, (start,), (chunk,)))
    return jax.lax.dynamic_update_slice(buf, s, (start,)), jnp.max(s)

  # Appended keys sit after every pre-block row, in block order; the earliest row tied with the
  # best score wins (`retrieval.tie_floor`). Their scores are computed directly (keys . xi) and the
  # pre-block ones from the combination above, so even equal keys differ by rounding (~1e-7): the
  # margin keeps such a tie a tie, which is common (the same prompt edited again with a new target
  # appends a copy of its key).
  s_in = jnp.where(visible_B, jnp.matmul(pre.keys_BxD, xi, precision=HIGHEST), -jnp.inf)

  def body(k, carry):
    buf, top = carry
    buf, chunk_top = scores_of(k, buf)
    return buf, jnp.maximum(top, chunk_top)

  s_pre, top = jax.lax.fori_loop(0, n_chunks, body, (jnp.full((cap,), -jnp.inf, jnp.float32),
                                                     jnp.max(s_in)))
  floor = tie_floor(rows.max(top))
  j_pre, j_in = rows.first(s_pre >= floor), jnp.argmax(s_in >= floor)
  take_in = j_pre == NONE  # no pre-block row on any device ties with the best
  score = jnp.where(take_in, s_in[j_in], rows.take(s_pre, j_pre))
  index = jnp.where(take_in, slot_B[j_in], j_pre).astype(jnp.int32)
  return Retrieval(index, score, score > threshold, jnp.zeros((cap,), jnp.float32), xi)
