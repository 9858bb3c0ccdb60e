"""GRACE (Hartvigsen et al.): Euclidean keys with per-key deferral radii; the value replaces y[p].

Lookup: j = nearest live key (rows 1..count-1; row 0 is HoReN's default key and is never used here),
d = ||q - k_j||; match iff d <= radius_j.

Edit rules for a new query q with label y (`decide`), with eps = `editor.grace_eps`:
  * no key yet, or d > radius_j + eps (the new ball would not touch j's ball): add (q, radius eps).
  * d <= radius_j + eps and label_j == y: reuse j (train its value further) and expand its radius to
    max(radius_j, d) so that q falls inside it.
  * d <= radius_j + eps and label_j != y: split: radius_j = d / 2, and add (q, radius d / 2).
Queries use the configured strategy; normalization is off for GRACE by default (Euclidean balls on
the raw layer input, as GRACE does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from horse_jax.editors.codebook.shards import Rows
from horse_jax.editors.precision import exact


class GraceLookup(NamedTuple):
  index: jax.Array  # [] int32 nearest live key (0 if none)
  distance: jax.Array  # [] float32 (inf if none)
  match: jax.Array  # [] bool, distance <= radius[index]


@exact  # distances meet radii (no product today; keeps any future one exact)
def lookup(q: jax.Array, keys_CxD: jax.Array, radius_C: jax.Array, count: jax.Array,
           rows: Rows = Rows()) -> GraceLookup:
  """Nearest key and whether q lies in its deferral ball (vmap over queries).

  `keys_CxD` / `radius_C` are the rows `rows` describes (one device's inside `shards.on_rows`: the
  smallest distance and its first row are then reduced over the devices).
  """
  idx = rows.index(keys_CxD.shape[0])
  live = (idx >= 1) & (idx < count)
  dist = jnp.linalg.norm(keys_CxD.astype(jnp.float32) - q.astype(jnp.float32)[None, :], axis=-1)
  dist = jnp.where(live, dist, jnp.inf)
  d = rows.min(jnp.min(dist))
  index = rows.first(dist == d)  # the first nearest row (row 0 when none is live: d = inf)
  return GraceLookup(index, d, d <= rows.take(radius_C, index))


class GraceDecision(NamedTuple):
  reuse: jax.Array  # [] bool
  split: jax.Array  # [] bool (implies not reuse: a key is added)
  index: jax.Array  # [] int32, nearest key
  distance: jax.Array  # [] float32
  new_radius_nearest: jax.Array  # [] float32, radius_j after the edit
  new_key_radius: jax.Array  # [] float32, radius of the added key (if one is added)


def decide(q: jax.Array, label: jax.Array, keys_CxD: jax.Array, radius_C: jax.Array,
           labels_Cx2: jax.Array, count: jax.Array, eps: float,
           rows: Rows = Rows()) -> GraceDecision:
  """GRACE's add / expand / split decision for one edit (see module docstring; `rows` as in
  `lookup`)."""
  near = lookup(q, keys_CxD, radius_C, count, rows)
  j, d = near.index, near.distance
  r_j = rows.take(radius_C, j)
  touches = d <= r_j + eps  # False when no key exists (d = inf)
  same = jnp.all(rows.take(labels_Cx2, j) == label)
  reuse = touches & same
  split = touches & ~same
  new_rj = jnp.where(reuse, jnp.maximum(r_j, d), jnp.where(split, d / 2, r_j))
  new_r = jnp.where(split, d / 2, eps)
  return GraceDecision(reuse, split, j, d, new_rj.astype(jnp.float32), new_r.astype(jnp.float32))
