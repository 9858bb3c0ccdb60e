"""Queries from the wrapped module's input h [T, d_in], as the HoReN reference selects them.

p is the edit position (last prompt token) and `start` the first real token (0 unless the prompt is
left-padded), so P = p - start + 1 prompt tokens:
  last_prompt_token              h[p]
  first_prompt_token             h[start]
  last_X_perc_prompt_tokens_avg  k = max(ceil(P * X / 100), 1), mean of the last k prompt tokens
  last_N_prompt_tokens_avg       k = min(N, P), same mean
then L2-normalised when normalization is on. Written as a weighted sum over T so p can be traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook.settings import parse_strategy
from horse_jax.editors.precision import exact


def query_weights(t: int, p: jax.Array, start: jax.Array, strategy: str) -> jax.Array:
  """Weights [T] (summing to 1) whose dot with h [T, d] is the strategy's query."""
  kind, num = parse_strategy(strategy)
  idx = jnp.arange(t)
  p = jnp.asarray(p, jnp.int32)
  start = jnp.asarray(start, jnp.int32)
  if kind == "last":
    return (idx == p).astype(jnp.float32)
  if kind == "first":
    return (idx == start).astype(jnp.float32)
  n_prompt = p - start + 1
  if kind == "perc":
    # ceil(P * X / 100) in integers: exact for integer X.
    k = jnp.maximum((n_prompt * num + 99) // 100, 1)
  else:
    k = jnp.minimum(num, n_prompt)
  inside = (idx > p - k) & (idx <= p)
  return inside.astype(jnp.float32) / k.astype(jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| (a zero vector stays zero)."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


@exact  # the query is a codebook key: compared by cosine / distance
def make_query(h_TxD: jax.Array, p: jax.Array, start: jax.Array, strategy: str,
               normalize: bool) -> jax.Array:
  """The query [d_in] (float32) of one sequence."""
  w = query_weights(h_TxD.shape[0], p, start, strategy)
  q = jnp.einsum("t,td->d", w, h_TxD.astype(jnp.float32))
  return l2_normalize(q) if normalize else q
