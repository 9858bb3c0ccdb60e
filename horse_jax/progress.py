"""Progress of the commands' stages: tqdm bars on a terminal, one log line per stage elsewhere.

  configure(quiet=args.quiet)                 # once per command (the CLI does it)
  with stage("loading model"):                # a bar with elapsed time on a terminal; in a log,
    ...                                       # "horse-jax: loading model: 3.2 s" when it ends
  for x in bar(items, desc="scoring"):        # a tqdm bar with rate and ETA on a terminal only
    ...
  bars_enabled()                              # what to pass as a library function's `progress`

`--quiet` silences both. Stages and bars write to stderr, so stdout keeps only results.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterable, Iterator

_QUIET = [False]


def configure(quiet: bool = False) -> None:
  """Sets whether stages and bars show anything (the CLI's --quiet)."""
  _QUIET[0] = bool(quiet)


def quiet() -> bool:
  return _QUIET[0]


def _terminal() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def bars_enabled() -> bool:
  """True when progress bars should draw: not --quiet and stderr is a terminal."""
  return not _QUIET[0] and _terminal()


def log(message: str) -> None:
  """One line on stderr unless --quiet (a stage's timing when stderr is not a terminal)."""
  if not _QUIET[0]:
    print(f"horse-jax: {message}", file=sys.stderr, flush=True)


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", disable: bool = False, **kw):
  """A tqdm bar (rate and ETA) that draws only on a terminal and not under --quiet.

  Args:
    iterable, total, desc, unit: as tqdm's.
    disable: the caller's own reason not to draw (e.g. a multi-host worker process).
    **kw: more tqdm options.
  """
  from tqdm.auto import tqdm  # noqa: PLC0415
  return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable or not bars_enabled(),
              dynamic_ncols=True, **kw)


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
  """One stage of a command: a bar on a terminal (elapsed time, and rate/ETA when `total` is known
  and the caller calls `.update(n)` on what this yields), else one line with its time at the end.

  Args:
    name: what the stage does ("loading model", "scoring 100 edits").
    total: the stage's steps, when it has countable ones.
    unit: their unit.

  Yields:
    The bar (update it with `.update(n)`); a no-op bar when nothing draws.
  """
  start = time.perf_counter()
  with bar(total=total, desc=name, unit=unit, leave=True,
           bar_format=None if total else "{desc}: {elapsed}") as b:
    yield b
    if total is None:
      b.refresh()
  if not _terminal():
    log(f"{name}: {time.perf_counter() - start:.1f} s")
