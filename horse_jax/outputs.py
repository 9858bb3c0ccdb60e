"""Output folders that never clobber a user's work and never look finished when they are not.

  out = prepare_output(args.out, inputs={"--model": args.model}, overwrite=args.overwrite)
  with output_folder(out, overwrite=args.overwrite) as tmp:   # built beside `out`
    ...write files into tmp...                                # swapped in whole at the end
  finished(out)                                               # True: the manifest says so

`prepare_output` runs before any work: an existing non-empty folder is refused unless the user
asked for `--overwrite`, and an output equal to, inside or containing an input folder is refused
always (overwriting it would delete the input). `output_folder` builds the result in a sibling
temp folder on the same filesystem and swaps it in at the end (the old folder is removed only after
the swap), so an interrupted run leaves no output folder, or the old one untouched. A folder is
finished when its manifest (`MANIFEST`, written last) says so; `horse-jax info` calls anything else
partial. Files and folders get the modes the umask gives (0644 / 0755 under umask 022), not the
0600 / 0700 of `tempfile`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator, Mapping

from horse_jax.errors import UserError
from horse_jax.io import apply_umask, apply_umask_tree, current_umask  # noqa: F401  (public here too)

MANIFEST = "horse-jax.json"

# Temp folders being built; the CLI's signal handler removes them before leaving (`discard_pending`).
_PENDING: set[str] = set()
# Held while a temp folder is swapped in, so a signal never lands between the two renames.
_LOCK = threading.RLock()


def _real(path: str | os.PathLike) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _within(child: str, parent: str) -> bool:
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_inputs(out: str | os.PathLike, inputs: Mapping[str, Any], flag: str = "--out") -> None:
  """Refuses an output folder that is, lies inside or contains an input.

  Args:
    out: the output folder.
    inputs: {flag: path} of what the command reads (None values are skipped). A folder may not
      equal, contain or lie inside `out`; a file may not lie inside `out`, nor may `out` be the
      file's own folder (writing there next to the data is refused, the file's parents are not).
    flag: how to name `out` in errors.
  """
  target = _real(out)
  for name, path in inputs.items():
    if path is None or str(path).startswith("hf:") or str(path) == "init":
      continue
    source = _real(path)
    if os.path.isfile(source):
      if _within(source, target) or target == os.path.dirname(source):
        raise UserError(f"{flag} {out}: holds the input {name} {path}; choose another output folder")
      continue
    if target == source:
      raise UserError(f"{flag} {out}: is the input {name} folder; choose another output folder")
    if _within(target, source):
      raise UserError(f"{flag} {out}: lies inside the input {name} {path}; choose another output folder")
    if _within(source, target):
      raise UserError(f"{flag} {out}: contains the input {name} {path}; choose another output folder")


def prepare_output(out: str | os.PathLike, *, inputs: Mapping[str, Any] | None = None,
                   overwrite: bool = False, flag: str = "--out") -> str:
  """Checks an output folder before a command does any work.

  Args:
    out: the output folder the user named.
    inputs: {flag: path} of the command's inputs (`check_inputs`); refused even with overwrite.
    overwrite: the user's --overwrite: an existing non-empty folder will be replaced (atomically,
      by `output_folder`) instead of refused.
    flag: how to name `out` in errors.

  Returns:
    `out` as an absolute path.

  Raises:
    UserError: `out` is a file, a non-empty folder without `overwrite`, or overlaps an input.
  """
  path = os.path.abspath(os.fspath(out))
  check_inputs(out, inputs or {}, flag)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {out}: is a file, not a folder")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise UserError(f"{flag} {out}: folder exists and is not empty (add --overwrite to replace it "
                    "whole, or choose another folder)")
  return path


def prepare_output_file(out: str | os.PathLike, *, inputs: Mapping[str, Any] | None = None,
                        overwrite: bool = False, flag: str = "--out") -> str:
  """Checks an output *file* before a command does any work (the file twin of `prepare_output`).

  Args:
    out: the file the user named (written later with `horse_jax.io.atomic_write_*`, so a failed
      run leaves an existing file untouched).
    inputs: {flag: path} of the command's inputs: `out` may not be an input file, nor lie inside an
      input folder (refused even with overwrite).
    overwrite: the user's --overwrite: an existing file will be replaced instead of refused.
    flag: how to name `out` in errors.

  Returns:
    `out` as an absolute path.

  Raises:
    UserError: `out` is a folder, an existing file without `overwrite`, or overlaps an input.
  """
  path = os.path.abspath(os.fspath(out))
  target = _real(out)
  for name, given in (inputs or {}).items():
    if given is None:
      continue
    source = _real(given)
    if target == source:
      raise UserError(f"{flag} {out}: is the input {name}; choose another file")
    if os.path.isdir(source) and _within(target, source):
      raise UserError(f"{flag} {out}: lies inside the input {name} {given}; choose another file")
  if os.path.isdir(path):
    raise UserError(f"{flag} {out}: is a folder, not a file")
  if os.path.lexists(path) and not overwrite:
    raise UserError(f"{flag} {out}: file exists (add --overwrite to replace it, or choose another file)")
  return path


def write_manifest(folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
  """Marks `folder` finished: the manifest, written last, names the command and its files."""
  from horse_jax import __version__  # noqa: PLC0415
  from horse_jax.io import atomic_write_json  # noqa: PLC0415
  folder = os.fspath(folder)
  files = sorted(os.path.relpath(os.path.join(d, f), folder)
                 for d, _, names in os.walk(folder) for f in names if f != MANIFEST)
  atomic_write_json(os.path.join(folder, MANIFEST),
                    {"finished": True, "version": __version__,
                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     **dict(info or {}), "files": files})


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
  """The manifest of a finished folder, else None (no manifest, or an unreadable one)."""
  try:
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) and manifest.get("finished") is True else None


def finished(folder: str | os.PathLike) -> bool:
  return read_manifest(folder) is not None


def discard_pending() -> None:
  """Removes every temp output folder still being built (the CLI calls it on SIGINT/SIGTERM)."""
  with _LOCK:
    for tmp in list(_PENDING):
      shutil.rmtree(tmp, ignore_errors=True)
      _PENDING.discard(tmp)


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: str, path: str) -> None:
  """Puts `tmp` at `path`; an existing `path` is removed only once the new folder is in place."""
  if not os.path.lexists(path):
    os.replace(tmp, path)
    return
  if _exchange(tmp, path):  # tmp now holds the old folder
    shutil.rmtree(tmp, ignore_errors=True)
    return
  parent, name = os.path.split(path)
  old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
  os.rmdir(old)
  os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, *, overwrite: bool = False,
                  manifest: Mapping[str, Any] | None = None, active: bool = True
                  ) -> Iterator[str | None]:
  """Builds an output folder beside `out` and swaps it in whole when the block ends without error.

  Args:
    out: the output folder (checked with `prepare_output` first).
    overwrite: replace an existing non-empty `out` (else it is refused at the swap too).
    manifest: extra fields for the manifest written last (`write_manifest`); a finished folder.
    active: False on processes that write nothing (multi-host workers): yields None, does nothing.

  Yields:
    The temp folder to write into (same filesystem as `out`).
  """
  if not active:
    yield None
    return
  path = os.path.abspath(os.fspath(out))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  with _LOCK:
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.partial-")
    _PENDING.add(tmp)
  try:
    apply_umask(tmp)
    yield tmp
    write_manifest(tmp, manifest)
    apply_umask_tree(tmp)
    with _LOCK:
      if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"--out {out}: folder appeared while the command ran (add --overwrite to "
                        "replace it)")
      if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
      _swap_in(tmp, path)
      _PENDING.discard(tmp)
  finally:
    with _LOCK:
      if tmp in _PENDING:
        shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)
