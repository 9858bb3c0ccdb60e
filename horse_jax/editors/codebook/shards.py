"""Codebook rows split over every device of a mesh: shard-local work and per-query reductions.

Layout: each buffer of the codebook (keys, values, labels, radius, LoRA factors) is split along its
row (capacity) axis over all devices of the (`data`, `model`) mesh (`ROW_AXES`): device (d, m) of a
D x M mesh holds the contiguous rows [i C / n, (i + 1) C / n) with i = d M + m and n = D M; the
count and the edit counter are replicated. The capacity is kept a multiple of n (`state.place`).

Retrieval (scores, threshold, nearest key, the damped Hopfield softmax, GRACE's distances), the
add/reuse decisions and the row writes run inside `jax.shard_map` (`on_rows`), each device on its
own rows. What crosses devices is per query only: a max, a sum of exponentials, the
softmax-weighted key sum ([d_in]: the Hopfield update needs it), the first row tied with the best
score, and the few rows a query reads from the device that holds them (a masked sum of [B, d]).
No device ever holds the whole key matrix.

`Rows` tells a function where its rows sit. `Rows()` (no mesh) is the whole codebook: offset 0 and
every reduction the identity, so one device runs the same code with the same floats as before the
split (the combined softmax sums are rescaled by exp(0) = 1 there).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

ROW_AXES = ("data", "model")  # mesh axes the rows may be split over, major first
NONE = jnp.iinfo(jnp.int32).max  # `Rows.first` where no row qualifies


class Rows(NamedTuple):
  """Where a function's codebook rows sit (static: a field of jitted closures).

  Attributes:
    axes: the mesh axes the rows are split over (inside `on_rows`); () = the whole codebook.
  """

  axes: tuple[str, ...] = ()

  def start(self, local: int) -> jax.Array:
    """Global index of the first of this device's `local` rows."""
    if not self.axes:
      return jnp.asarray(0, jnp.int32)
    return (jax.lax.axis_index(self.axes) * local).astype(jnp.int32)

  def index(self, local: int) -> jax.Array:
    """Global indices [local] of this device's rows."""
    return self.start(local) + jnp.arange(local, dtype=jnp.int32)

  def max(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.axes) if self.axes else x

  def min(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmin(x, self.axes) if self.axes else x

  def sum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.axes) if self.axes else x

  def first(self, mask_C: jax.Array) -> jax.Array:
    """The first global row whose (this device's) `mask_C` entry holds; `NONE` if none anywhere."""
    local = jnp.argmax(mask_C).astype(jnp.int32)
    here = jnp.where(mask_C[local], self.start(mask_C.shape[0]) + local, NONE)
    return self.min(here)

  def take(self, buf: jax.Array, j: jax.Array) -> jax.Array:
    """buf[j] for one global row j, read from the device that holds it (vmap it over rows)."""
    n = buf.shape[0]
    i = j - self.start(n)
    row = buf[jnp.clip(i, 0, n - 1)]
    if not self.axes:
      return row
    here = (i >= 0) & (i < n)
    if row.dtype == jnp.bool_:
      return self.sum(jnp.where(here, row, False).astype(jnp.int32)) > 0
    # A masked sum: the holder's row plus zeros, exact.
    return self.sum(jnp.where(here, row, jnp.zeros_like(row)))

  def put(self, buf: jax.Array, j: jax.Array, value: jax.Array, when: jax.Array) -> jax.Array:
    """buf with global row j set to `value` where `when` (on the device that holds it)."""
    n = buf.shape[0]
    i = j - self.start(n)
    write = when & (i >= 0) & (i < n)
    i = jnp.clip(i, 0, n - 1)
    return buf.at[i].set(jnp.where(write, value.astype(buf.dtype), buf[i]))

  def put_many(self, buf: jax.Array, j_B: jax.Array, rows_B: jax.Array, when_B: jax.Array
               ) -> jax.Array:
    """buf with global rows j_B set to rows_B where when_B (distinct rows; others dropped)."""
    n = buf.shape[0]
    i = j_B - self.start(n)
    i = jnp.where(when_B & (i >= 0) & (i < n), i, n)  # out of range: dropped
    return buf.at[i].set(rows_B.astype(buf.dtype), mode="drop")


def row_axes(mesh) -> tuple[str, ...]:
  """The axes of `mesh` the codebook rows are split over: those of `ROW_AXES` it has with more than
  one device (a 1-wide axis is left out, as XLA leaves it out of the shardings it hands back)."""
  return tuple(a for a in ROW_AXES if a in mesh.shape and mesh.shape[a] > 1)


def row_devices(mesh) -> int:
  """How many slices the rows are split into on `mesh` (1 without a mesh)."""
  if mesh is None:
    return 1
  n = 1
  for axis in row_axes(mesh):
    n *= int(mesh.shape[axis])
  return n


def specs(book, mesh):
  """PartitionSpecs of the codebook buffers on a (`data`, `model`) mesh.

  Every buffer is split along its rows (the capacity axis) over all devices of the mesh, `data`
  major (`ROW_AXES`): each device holds capacity / n whole rows of keys, values, labels,
  radii and LoRA factors, and retrieval runs on them where they are (`on_rows`), so no
  device needs another's keys. Scalars (count, n_edits) are replicated, and so are zero-size
  buffers (value mode's LoRA factors: the form XLA hands back, so an edit's output shardings equal
  its input ones and the next edit does not recompile).

  Raises:
    ValueError: the capacity is not a multiple of the mesh's devices (`place` grows it to one).
  """
  n = row_devices(mesh)
  if book.capacity % n:
    raise ValueError(f"codebook capacity {book.capacity} is not a multiple of the {n} devices of "
                     "the mesh: place it with state.place(book, mesh)")
  rows = row_axes(mesh)

  def spec(x):
    return P(rows) if rows and x.ndim and x.size else P()

  return jax.tree_util.tree_map(spec, book)


def on_rows(fn: Callable, mesh, book, *args, returns: tuple[str, ...] = ("book",)):
  """fn(rows, book, *args) on each device's codebook rows, or on the whole codebook without a mesh.

  Args:
    fn: the shard-local function; it sees this device's rows of every buffer (`state.specs`) and
      the whole of each of `args`, and does every cross-device reduction through its `Rows`.
    mesh: the (`data`, `model`) mesh, or None.
    book: the codebook (row-split on the mesh, `state.place`).
    *args: pytrees every device sees whole (replicated: queries, labels, small per-edit arrays).
    returns: what fn returns, in order: "book" (a codebook, row-split like the input) or
      "replicated" (the same on every device: results of reductions). One entry: fn returns it
      alone.

  Returns:
    fn's result.
  """
  if mesh is None:
    return fn(Rows(), book, *args)
  book_specs = specs(book, mesh)
  outs = tuple(book_specs if r == "book" else P() for r in returns)
  body = lambda book_, *args_: fn(Rows(row_axes(mesh)), book_, *args_)
  # Replication of the outputs is by construction (they come from reductions), which the
  # shard_map varying-axes check cannot see through the scans.
  return jax.shard_map(body, mesh=mesh, in_specs=(book_specs,) + (P(),) * len(args),
                       out_specs=outs[0] if len(outs) == 1 else outs, check_vma=False)(book, *args)
