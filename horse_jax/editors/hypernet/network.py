"""The hypernetwork: residual low-rank blocks shared by all edited modules of one shape.

On h = normalize(concat(k, g)) of width W = d_k + d_v, each of `n_blocks` blocks computes

  x = relu(h @ A @ B + bias);  x = scale[m] * x + shift[m];  h = x + h

with A [W, r] ~ N(0, 1), B [r, W] = 0, bias = 0, scale = 1, shift = 0, so a fresh net is the identity.
Module m (its rank among the edited modules of this shape, in config order) picks its own scale/shift
rows and its own scalars `lr[m]` (init `editor.lr`) and `lamda[m]` (init 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horse_jax.editors.precision import exact


def init_net(key: jax.Array, width: int, rank: int, n_modules: int, n_blocks: int,
             lr: float) -> dict:
  """Fresh params of one shape's hypernetwork.

  Args:
    key: PRNG key for the A matrices.
    width: d_k + d_v.
    rank: inner rank r of each block.
    n_modules: number of edited modules sharing this shape.
    n_blocks: number of residual blocks.
    lr: initial per-module editing learning rate.

  Returns:
    {"blocks": [{"A", "B", "bias", "scale", "shift"}, ...], "lr": [n_modules], "lamda": [n_modules]}.
  """
  blocks = []
  for k in jax.random.split(key, n_blocks):
    blocks.append({
        "A": jax.random.normal(k, (width, rank), jnp.float32),
        "B": jnp.zeros((rank, width), jnp.float32),
        "bias": jnp.zeros((width,), jnp.float32),
        "scale": jnp.ones((n_modules, width), jnp.float32),
        "shift": jnp.zeros((n_modules, width), jnp.float32),
    })
  return {"blocks": blocks, "lr": jnp.full((n_modules,), lr, jnp.float32),
          "lamda": jnp.zeros((n_modules,), jnp.float32)}


@exact  # its outputs feed the ridge solve: float32 products (horse_jax.editors.precision)
def apply_blocks(blocks: list[dict], h_CxW: jax.Array, m: int) -> jax.Array:
  """Runs the residual blocks for module index m over normalized rows h [C, W]."""
  for blk in blocks:
    x = jnp.maximum(h_CxW @ blk["A"] @ blk["B"] + blk["bias"][None, :], 0.0)
    x = blk["scale"][m][None, :] * x + blk["shift"][m][None, :]
    h_CxW = x + h_CxW
  return h_CxW
