"""Atomic file output: nothing a command already wrote is left half-written after a failure.

Files and folders get the modes a plain open()/mkdir() would give under the process umask (0644 /
0755 under umask 022), not the private 0600 / 0700 of the temp files they are built from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator

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
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    apply_umask(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


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
