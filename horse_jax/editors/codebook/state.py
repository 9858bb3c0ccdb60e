"""The codebook: preallocated key/value/label/radius/LoRA buffers that grow by doubling.

Rows [0, count) are live; row 0 is the default key (a random direction with a zero value and a label
that never matches). Shapes change only when `grow` doubles the capacity, so the jitted edit step is
compiled once per capacity bucket (O(log n) times for n edits), not once per edit.

Labels: each edit's label (its label row, -100s included, padding removed) is reduced on the host to
a 2 x int32 `label key` (`label_key`). Two keys are "equal labels" iff their label keys are equal:
  mean  (default, the reference): the float32 mean of the label array, bit-cast to int32, then 0.
  exact (option): a 64-bit BLAKE2b hash of the int32 label array ("same target tokens at the same
        positions", without the collisions of the mean).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax import distributed
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.editors.codebook.shards import row_devices, specs  # noqa: F401  (specs: re-exported)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Codebook:
  """Codebook state (a pytree; capacity C = keys.shape[0]).

  Attributes:
    keys: [C, d_in] float32.
    values: [C, d_out] float32 (value mode; GRACE's replacement vectors).
    labels: [C, 2] int32 label keys.
    radius: [C] float32 GRACE deferral radii (unused by HoReN).
    lora_a: [C, r, d_out] float32 (r = 0 outside LoRA mode).
    lora_b: [C, d_out, r] float32.
    count: [] int32, number of live rows (the default row included).
    n_edits: [] int32, edits applied so far (seeds each edit's initialisation).
  """

  keys: jax.Array
  values: jax.Array
  labels: jax.Array
  radius: jax.Array
  lora_a: jax.Array
  lora_b: jax.Array
  count: jax.Array
  n_edits: jax.Array

  @property
  def capacity(self) -> int:
    return int(self.keys.shape[0])

  def nbytes(self) -> int:
    """Bytes held by the buffers (allocated capacity, not only live rows)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))


def init(settings: CodebookSettings, d_in: int, d_out: int) -> Codebook:
  """An empty codebook holding only the default row.

  Args:
    settings: editor settings (capacity, normalization, LoRA rank, seed).
    d_in: input width of the wrapped module (key width).
    d_out: output width (value width).

  Returns:
    Codebook with count 1 (HoReN default key; GRACE never considers row 0).
  """
  cap, r = settings.initial_capacity, settings.lora_r
  default = jax.random.normal(jax.random.PRNGKey(settings.seed), (d_in,), jnp.float32)
  if settings.normalize_codebook_keys:
    default = default / jnp.linalg.norm(default)
  keys = jnp.zeros((cap, d_in), jnp.float32).at[0].set(default)
  return Codebook(
      keys=keys,
      values=jnp.zeros((cap, d_out), jnp.float32),
      labels=jnp.zeros((cap, 2), jnp.int32),
      radius=jnp.zeros((cap,), jnp.float32),
      lora_a=jnp.zeros((cap, r, d_out), jnp.float32),
      lora_b=jnp.zeros((cap, d_out, r), jnp.float32),
      count=jnp.asarray(1, jnp.int32),
      n_edits=jnp.asarray(0, jnp.int32),
  )


def grow(book: Codebook, capacity: int) -> Codebook:
  """The same codebook with zero rows appended up to `capacity` (no-op if already that large)."""
  extra = capacity - book.capacity
  if extra <= 0:
    return book

  def pad(x):
    if x.ndim == 0:
      return x
    return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)], axis=0)

  return jax.tree_util.tree_map(pad, book)


def ensure_room(book: Codebook, rows: int = 1, count: int | None = None) -> Codebook:
  """Doubles the capacity until `rows` more rows fit.

  Args:
    book: the codebook.
    rows: rows that must fit after the live ones.
    count: the live rows if the caller tracks them on the host (or an upper bound); default reads
      `book.count` (one host sync).

  Returns:
    The codebook, grown if needed.
  """
  need = (int(book.count) if count is None else int(count)) + rows
  return grow(book, planned_capacity(need, book.capacity))


def planned_capacity(rows: int, current: int) -> int:
  """The smallest power-of-two multiple of `current` holding `rows` rows (at least `current`).

  A run whose number of edits is known up front asks for count + n_edits rows once, so it compiles
  one program for its capacity instead of one per doubling; doubling from the current capacity (not
  rounding to any size) keeps runs of different lengths on the same few buckets.
  """
  cap = max(int(current), 1)
  while cap < rows:
    cap *= 2
  return cap


def mesh_capacity(capacity: int, mesh) -> int:
  """The smallest multiple of the mesh's device count holding `capacity` rows (the capacity itself
  without a mesh). Doubling keeps a multiple a multiple, so a codebook placed once stays
  divisible as it grows."""
  n = row_devices(mesh)
  return -(-int(capacity) // n) * n


def shardings(book: Codebook, mesh) -> Codebook:
  """NamedShardings of the codebook buffers (see `specs`)."""
  from jax.sharding import NamedSharding, PartitionSpec
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs(book, mesh),
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def place(book: Codebook, mesh) -> Codebook:
  """The codebook on the mesh with its declared shardings, its capacity first grown to a multiple
  of the mesh's devices (`mesh_capacity`); unchanged when mesh is None."""
  if mesh is None:
    return book
  book = grow(book, mesh_capacity(book.capacity, mesh))
  return jax.device_put(book, shardings(book, mesh))


def fitted(book: Codebook, mesh=None, parts: int = 16) -> Codebook:
  """The codebook cut to its live rows, rounded up to a multiple of capacity / `parts` (and of the
  mesh's devices), for inference: retrieval reads every row of the buffers it is given, and rows
  beyond the count never match, so a book preallocated for a long run (count just above a power of
  two: up to half its rows empty) costs up to twice the products it needs. Rounding keeps the
  programs compiled for it to a few shapes per capacity. One host read of the count.

  Args:
    book: the codebook.
    mesh: the mesh it is placed on (`mesh_of`), or None.
    parts: the rounding step is capacity / parts rows.

  Returns:
    The cut codebook (the same object when no row would be dropped).
  """
  step = mesh_capacity(max(book.capacity // parts, 1), mesh)
  rows = min(book.capacity, -(-int(book.count) // step) * step)
  if rows >= book.capacity:
    return book
  return place(jax.tree_util.tree_map(lambda x: x[:rows] if x.ndim else x, book), mesh)


def mesh_of(book: Codebook):
  """The mesh a codebook was placed on (`place`), or None for a codebook on one device."""
  from jax.sharding import NamedSharding
  sharding = getattr(book.keys, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


ROW_ARRAYS = ("keys", "values", "labels", "radius", "lora_a", "lora_b")  # one row per codebook entry


def stored_specs(book: Codebook) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
  """(name, dtype, shape) of each array a saved codebook holds, in file order: the live rows of
  `ROW_ARRAYS` (zero-size LoRA factors, value mode, are left out), then "count" and "n_edits" as
  int64 [1]. Reads only the scalar `count` from the device."""
  n = int(distributed.to_host(book.count))
  out = []
  for name in ROW_ARRAYS:
    array = getattr(book, name)
    shape = (n, *array.shape[1:])
    if int(np.prod(shape)) or name not in ("lora_a", "lora_b"):
      out.append((name, np.dtype(array.dtype), shape))
  return out + [("count", np.dtype(np.int64), (1,)), ("n_edits", np.dtype(np.int64), (1,))]


def stored_array(book: Codebook, name: str, n: int) -> np.ndarray:
  """One array of `stored_specs` on the host: the first `n` rows of a row array (gathered alone,
  collectively across processes), or "count" / "n_edits" as int64 [1]."""
  if name in ("count", "n_edits"):
    return np.asarray([int(distributed.to_host(getattr(book, name)))], np.int64)
  return distributed.to_host(getattr(book, name))[:n]


def from_arrays(arrays: dict[str, np.ndarray], capacity: int | None = None) -> Codebook:
  """Rebuilds a codebook from `stored_specs` arrays, padded to `capacity` (default: next power of two)."""
  n = int(np.asarray(arrays["count"]).reshape(-1)[0])
  d_out = np.asarray(arrays["values"]).shape[1]
  # Zero-size LoRA factors (value mode) are not stored: orbax refuses zero-size arrays.
  lora_a = arrays.get("lora_a", np.zeros((n, 0, d_out), np.float32))
  lora_b = arrays.get("lora_b", np.zeros((n, d_out, 0), np.float32))
  cap = capacity or 2
  while cap < n + 1:
    cap *= 2
  book = Codebook(
      keys=jnp.asarray(arrays["keys"], jnp.float32),
      values=jnp.asarray(arrays["values"], jnp.float32),
      labels=jnp.asarray(arrays["labels"], jnp.int32),
      radius=jnp.asarray(arrays["radius"], jnp.float32),
      lora_a=jnp.asarray(lora_a, jnp.float32),
      lora_b=jnp.asarray(lora_b, jnp.float32),
      count=jnp.asarray(n, jnp.int32),
      n_edits=jnp.asarray(int(np.asarray(arrays["n_edits"]).reshape(-1)[0]), jnp.int32),
  )
  return grow(book, cap)


def label_key(labels_T: np.ndarray, length: int, mode: str) -> np.ndarray:
  """The 2 x int32 label key of one edit.

  Args:
    labels_T: the edit's label row (target ids where predicted, else -100), maybe right-padded.
    length: its unpadded length (attention mask sum): the reference runs batch size 1, unpadded.
    mode: "mean" (reference: equal float mean of the whole array, -100s included) or "exact".

  Returns:
    int32 [2].
  """
  row = np.asarray(labels_T, np.int64)[:length]
  if mode == "mean":
    bits = np.asarray([np.float32(row.astype(np.float64).mean())], np.float32).view(np.int32)
    return np.asarray([bits[0], 0], np.int32)
  digest = hashlib.blake2b(row.astype("<i4").tobytes(), digest_size=8).digest()
  return np.frombuffer(digest, dtype="<i4").astype(np.int32)
