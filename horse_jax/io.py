"""Atomic file output: nothing a command already wrote is left half-written after a failure.

Files and folders get the modes a plain open()/mkdir() would give under the process umask (0644 /
0755 under umask 022), not the private 0600 / 0700 of the temp files they are built from.
`stream_safetensors` writes a safetensors file one tensor at a time (bounded host memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows (thread safe)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  with _UMASK_LOCK:  # portable fallback: set and restore
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def apply_umask(path: str | os.PathLike) -> None:
  """Gives `path` the mode a plain open()/mkdir() would have (mkstemp/mkdtemp give 0600/0700)."""
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~current_umask())


def apply_umask_tree(root: str) -> None:
  """Umask modes for `root` and everything under it that is private (0600 files / 0700 folders
  from temp-file writers, orbax's own included); executable bits a writer chose are kept."""
  mask = current_umask()
  for folder, dirs, files in os.walk(root):
    os.chmod(folder, 0o777 & ~mask)
    for name in files:
      path = os.path.join(folder, name)
      if os.path.islink(path):
        continue
      mode = os.stat(path).st_mode & 0o777
      os.chmod(path, (mode | 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then renames over `path`."""
  with _atomic_file(path) as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temp folder beside `path`; on success it replaces `path` whole, on failure it is removed."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
  try:
    apply_umask(tmp)
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  apply_umask_tree(tmp)  # writers such as safetensors' save_file create 0600 files
  if os.path.isdir(path):
    old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
    os.rmdir(old)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)


# safetensors dtype codes (the format's header names) of the NumPy dtypes we write.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                       "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                       "bool": "BOOL"}


def safetensors_header(specs: Sequence[tuple[str, Any, Sequence[int]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
  """The header of a safetensors file whose tensors are stored in `specs` order.

  The layout is the format's: an 8-byte little-endian header length, a JSON header
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces
  to a multiple of 8 bytes (so every tensor's data stays 8-byte aligned for memory-mapped readers),
  then the tensors' raw little-endian C-order bytes back to back.

  Args:
    specs: (name, NumPy dtype, shape) of each tensor, in file order.
    metadata: string -> string metadata (transformers reads {"format": "pt"}).

  Returns:
    The bytes that precede the first tensor's data.
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, dtype, shape in specs:
    dtype = np.dtype(dtype)
    if dtype.name not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{name}: dtype {dtype.name} has no safetensors code")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": [int(s) for s in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text


def stream_safetensors(path: str | os.PathLike | None,
                       specs: Sequence[tuple[str, Any, Sequence[int]]],
                       produce: Callable[[int], np.ndarray],
                       metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file one tensor at a time: at most one produced tensor is alive.

  `safetensors.numpy.save_file` needs every tensor of the file in memory at once; here the header
  is written from `specs` first and each tensor is appended as soon as `produce` returns it. With
  `path` None nothing is written but `produce` is still called for every tensor in order: the
  processes of a multi-host run that do not write still take part in each tensor's gather.

  Args:
    path: the file (replaced atomically, see `atomic_write_bytes`), or None to only produce.
    specs: (name, NumPy dtype, shape) of each tensor, in file order.
    produce: i -> the i-th tensor, a NumPy array of exactly that dtype and shape.
    metadata: string -> string header metadata.

  Returns:
    The bytes of tensor data (the file size minus the header).

  Raises:
    ValueError: a produced tensor does not match its spec.
  """
  header = safetensors_header(specs, metadata)
  total = 0
  with contextlib.ExitStack() as stack:
    f = stack.enter_context(_atomic_file(path)) if path is not None else None
    if f is not None:
      f.write(header)
    for i, (name, dtype, shape) in enumerate(specs):
      value = produce(i)
      if value.dtype != np.dtype(dtype) or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: produced {value.dtype}{list(value.shape)}, declared "
                         f"{np.dtype(dtype)}{list(shape)}")
      if f is not None:
        if value.dtype.byteorder == ">":  # the format is little-endian
          value = value.astype(value.dtype.newbyteorder("<"))
        # A byte view of the array: no copy when it is already C-contiguous.
        f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
      total += value.nbytes
      del value
  return total


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Any]:
  """An open binary file at a temp path beside `path`, fsynced and renamed over it on success."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    apply_umask(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


# ---- pytrees: an edit state saved for resume ----

PYTREE_ARRAYS = "arrays.safetensors"  # the array leaves, keyed by tree path
PYTREE_LEAVES = "leaves.json"  # the other leaves (Python numbers, strings, None), keyed alike


def _is_array(leaf) -> bool:
  import numpy as np  # noqa: PLC0415
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype") or isinstance(leaf, np.generic)


def save_pytree(folder: str | os.PathLike, tree: Any) -> None:
  """Writes a pytree into `folder` (replacing it whole, atomically): array leaves (jax or NumPy,
  gathered to the host) in arrays.safetensors, other leaves (ints, floats, strings) in leaves.json,
  each under its `jax.tree_util.keystr` path.

  Args:
    folder: the folder to write.
    tree: the pytree (NamedTuples, dicts, lists; leaves as above).
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415
  arrays, plain = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    if _is_array(leaf):
      arrays[key] = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    else:
      plain[key] = leaf
  with atomic_directory(folder) as tmp:
    save_file(arrays, os.path.join(tmp, PYTREE_ARRAYS))
    atomic_write_json(os.path.join(tmp, PYTREE_LEAVES), plain, indent=None)


def load_pytree(folder: str | os.PathLike, like: Any) -> Any:
  """Reads a pytree written by `save_pytree` into the structure of `like`.

  Array shapes and dtypes come from the file (a state whose arrays grow, e.g. WISE's stored
  memories, reads back whole); a jax leaf of `like` gives the loaded array its sharding when the
  shapes agree. Leaves the file lacks or holds beyond `like` are an error.

  Args:
    folder: the folder `save_pytree` wrote.
    like: a pytree of the same structure (e.g. a fresh state of the same editor).

  Returns:
    The pytree read back (jax arrays where `like` holds jax arrays, NumPy arrays elsewhere).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  from horse_jax.errors import UserError  # noqa: PLC0415
  try:
    arrays = load_file(os.path.join(folder, PYTREE_ARRAYS))
    with open(os.path.join(folder, PYTREE_LEAVES), encoding="utf-8") as f:
      plain = json.load(f)
  except (OSError, ValueError) as err:
    raise UserError(f"{folder}: not a saved state ({err})") from None
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  out, seen = [], set()
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path)
    seen.add(key)
    if key in arrays:
      value = arrays[key]
      if getattr(leaf, "shape", None) == () and value.shape == (1,):
        value = value.reshape(())  # safetensors stores a scalar as one element
      if isinstance(leaf, jax.Array):
        value = (jax.device_put(value, leaf.sharding) if value.shape == leaf.shape
                 else jnp.asarray(value))
    elif key in plain:
      value = plain[key]
    else:
      raise UserError(f"{folder}: the saved state has no {key} (saved by another method or version)")
    out.append(value)
  extra = sorted((set(arrays) | set(plain)) - seen)
  if extra:
    raise UserError(f"{folder}: the saved state has {extra[0]} that this state lacks (saved by "
                    "another method or version)")
  return jax.tree_util.tree_unflatten(treedef, out)
