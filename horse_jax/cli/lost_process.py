"""One line instead of the distributed runtime's abort report when a process of a multi-host run is
lost (the `horse-jax` console script only).

When a process dies (or stops answering), JAX's coordination service tells every other process,
and each one's runtime client ends its process with a fatal C++ log: the status over several
lines, "Terminating process because the JAX distributed service detected fatal errors" and a
stack dump. That callback cannot be replaced from Python (the binding fails to pass its status to a
Python function and the process terminates anyway), so the command's stderr runs through this
filter, a small child process started before `jax.distributed.initialize`:

  start(process_id, coordinator)     every later write to fd 2 goes through the filter (and every
                                     write to fd 1 through one that only drops gloo's notices)

The filter passes every line through, except gloo's connection notices and the runtime's
distributed-failure report: log lines
of the coordination service are held back for a few seconds; if the fatal line follows, they, the
fatal line and the stack dump become one line naming what was lost ("lost process 1 ...", "lost
the coordinator ..."), else they are passed on unchanged. The process still exits non-zero (the
runtime aborts it: status 134).

A collective that was running when a peer died fails first (gloo: "Connection reset by peer"):
`wait_for_verdict` then lets the coordination service name the lost process (within its heartbeat
timeout) before it reports the collective's error itself.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

# A glog-format line of XLA's C++ runtime: severity, date, time, thread, file:line].
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w.]+):\d+\] ")
_DISTRIBUTED_FILES = (b"coordination_service", b"preemption_sync_manager", b"client.h", b"client.cc",
                      b"service.cc")
_FATAL_MARKS = (b"distributed service detected fatal errors", b"coordination service")
# gloo's connection notice ("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of
# connected peer ranks is : 1"), which the C++ library writes to stdout, piece by piece (so two
# threads' notices interleave), whenever it opens a collective context: nothing the user acts on.
_GLOO_PIECES = (b"[Gloo] Rank ", b" is connected to ", b" peer ranks. Expected number of connected peer ranks is : ")
_DIGITS = re.compile(rb"^[\d\s]*$")


def strip_gloo_notice(line: bytes) -> bytes:
  """`line` without gloo's connection notice pieces (b"" when nothing else was on it)."""
  if not any(piece in line for piece in _GLOO_PIECES):
    return line
  for piece in _GLOO_PIECES:
    line = line.replace(piece, b"")
  return b"" if _DIGITS.match(line) else line


# Seconds a held-back runtime log line waits for a fatal line before it is passed on unchanged.
HOLD_S = 5.0


def start(process_id: int | None, coordinator: str | None) -> None:
  """Routes this process's fd 2 through the filter (call once, before JAX's distributed runtime).

  Args:
    process_id: this process's index (None: not known yet, e.g. --distributed auto).
    coordinator: the coordinator's HOST:PORT, to name it in the line (None: not known).
  """
  for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
    stream.flush()
    read_fd, write_fd = os.pipe()
    # The filter writes to what `fd` is now and reads the pipe; it ends when every writer has
    # closed it (this process has exited), after passing on what it still holds.
    target = os.dup(fd)
    mode = ["--stdout"] if fd == 1 else []
    subprocess.Popen([sys.executable, "-m", "horse_jax.cli.lost_process", str(process_id),
                      coordinator or "", *mode], stdin=read_fd, stdout=target, close_fds=True,
                     start_new_session=True)  # a Ctrl-C meant for the command leaves it alone
    os.close(read_fd)
    os.close(target)
    os.dup2(write_fd, fd)
    os.close(write_fd)


def verdict(text: bytes, process_id: str, coordinator: str) -> str:
  """The one line for the runtime's failure report `text` (held log lines and the fatal line)."""
  tasks = re.findall(rb"[Tt]ask[: ](\d+) heartbeat timeout", text)
  unhealthy = re.search(rb"stopped sending heartbeats\)?:?\s*([\d,\s]+)", text)
  if unhealthy:
    tasks += re.findall(rb"\d+", unhealthy.group(1))
  lost = sorted({int(t) for t in tasks} - ({int(process_id)} if process_id.isdigit() else set()))
  if lost:
    names = ", ".join(str(t) for t in lost)
    return f"multi-host: lost process {names} (it stopped sending heartbeats); stopping"
  if process_id != "0":
    where = f" at {coordinator}" if coordinator else ""
    return f"multi-host: lost the coordinator (process 0{where}); stopping"
  status = re.search(rb"(UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|CANCELLED): ([^\n]*)", text)
  detail = status.group(0).decode("utf-8", "replace")[:200] if status else "see the other processes"
  return f"multi-host: the distributed runtime failed ({detail}); stopping"


def _is_distributed_log(line: bytes) -> bool:
  match = _LOG_LINE.match(line)
  return bool(match) and any(match.group(2).startswith(f) for f in _DISTRIBUTED_FILES)


def _is_fatal(line: bytes, holding: bool) -> bool:
  match = _LOG_LINE.match(line)
  return bool(match) and match.group(1) == b"F" and (
      holding or any(mark in line for mark in _FATAL_MARKS))


def run(process_id: str, coordinator: str, source=None, sink=None, report_lost: bool = True) -> None:
  """The filter loop: `source` (default stdin) to `sink` (default stdout), line by line.

  Args:
    process_id, coordinator: as given to `start`, to name what was lost.
    source, sink: binary streams (default: this process's stdin and stdout).
    report_lost: True for the command's stderr (the runtime's failure report becomes one line);
      False for its stdout, where only gloo's connection notices are removed.
  """
  source = source if source is not None else sys.stdin.buffer
  sink = sink if sink is not None else sys.stdout.buffer
  fd = source.fileno()
  held: list[bytes] = []
  held_at = 0.0
  pending = b""
  done = False  # the fatal report was replaced: drop everything after it
  while True:
    timeout = max(0.0, held_at + HOLD_S - time.monotonic()) if held else None
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:  # held lines with no fatal line after them: an ordinary log, pass it on
      sink.write(b"".join(held))
      sink.flush()
      held = []
      continue
    chunk = os.read(fd, 65536)
    if not chunk:
      if pending:
        held.append(pending) if held else sink.write(pending)
      if held and not done:
        sink.write(b"".join(held))
      sink.flush()
      return
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
      line = strip_gloo_notice(line + b"\n")
      if done or not line:
        continue
      if not report_lost:
        sink.write(line)
      elif _is_fatal(line, bool(held)):
        text = b"".join(held) + line
        sink.write(f"horse-jax: error: {verdict(text, process_id, coordinator)}\n".encode())
        sink.flush()
        held, done = [], True
      elif held or _is_distributed_log(line):
        if not held:
          held_at = time.monotonic()
        held.append(line)  # a runtime log line, or one that continues it
      else:
        sink.write(line)
    sink.flush()


def wait_for_verdict(error: BaseException, timeout_s: float) -> str | None:
  """After a collective failed in a multi-host run: the line to report when the coordination
  service has not ended this process within `timeout_s` (it names the lost process when one is),
  or None when `error` is not a lost-peer failure.
  """
  text = str(error)
  if not re.search(r"[Gg]loo|Connection (reset|closed)|closed by peer|UNAVAILABLE", text):
    return None
  time.sleep(timeout_s)  # the runtime's own verdict ends the process through the filter first
  first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
  return f"multi-host: a collective failed and no process was reported lost: {first}"


if __name__ == "__main__":
  run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "", report_lost="--stdout" not in sys.argv[3:])
