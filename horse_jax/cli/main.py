"""Entry point of the `horse-jax` console script.

Each sub-command lives in its own module exposing `register(subparsers)`, which adds a parser whose
`func(args) -> int` runs it. Errors a user can cause (`UserError`) end with one line and exit 2.

Run as the console script, SIGINT / SIGTERM end the command at any moment with one line and exit
130 / 143: a watcher thread (woken by `signal.set_wakeup_fd`, so it runs even while the main thread
is inside XLA) removes the output folder being built and leaves with `os._exit`. Raising
KeyboardInterrupt instead could land in a JAX callback (and be swallowed) or race XLA's threads at
interpreter teardown (a segfault).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from horse_jax.errors import UserError

# (module, command) pairs; a module that is missing (a feature not yet built) is skipped.
COMMANDS = (
    "horse_jax.cli.demo",
    "horse_jax.cli.train",
    "horse_jax.cli.edit",
    "horse_jax.cli.eval",
    "horse_jax.cli.world",
    "horse_jax.cli.convert",
    "horse_jax.cli.bench",
    "horse_jax.cli.show_settings",
    "horse_jax.cli.plan",
)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def version() -> str:
  """The installed package's version (package metadata), else the source tree's."""
  from importlib import metadata  # noqa: PLC0415
  try:
    return metadata.version("horse-jax")
  except metadata.PackageNotFoundError:
    from horse_jax import __version__  # noqa: PLC0415
    return __version__


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="horse-jax",
      description="Knowledge editing for LLMs in JAX: HORSE, MALMEN, MEND, HoReN, GRACE.")
  parser.add_argument("--version", action="version", version=f"horse-jax {version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMANDS:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as err:
      if err.name == name:
        continue
      raise
    module.register(sub)
  for command in set(sub.choices.values()):
    _add_quiet(command)
  return parser


def _add_quiet(p: argparse.ArgumentParser) -> None:
  """--quiet on every command (and sub-action), declared once here."""
  if "--quiet" not in p._option_string_actions:  # noqa: SLF001  (argparse has no public query)
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
  for action in p._actions:  # noqa: SLF001
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      for child in set(action.choices.values()):
        _add_quiet(child)


def silence_third_party() -> None:
  """No third-party notices on the command line (transformers' "PyTorch was not found", JAX's
  platform fallback chatter, absl/orbax info lines, library deprecation warnings). Set by the
  CLI only: a library user keeps their own logging and warnings configuration."""
  import logging  # noqa: PLC0415
  import warnings  # noqa: PLC0415
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  warnings.filterwarnings("ignore")
  warnings.filterwarnings("default", module=r"horse_jax(\.|$)")
  for name in ("jax", "jax._src.xla_bridge", "absl", "orbax", "transformers", "datasets",
               "tensorflow", "torch"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging  # noqa: PLC0415
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _leave(signum: int) -> None:
  """Removes the output being built, says why in one line and exits without interpreter teardown."""
  from horse_jax import outputs  # noqa: PLC0415
  try:
    outputs.discard_pending()
  finally:
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # noqa: BLE001  (a stream closed by the main thread: nothing to flush)
        pass
    name = signal.Signals(signum).name
    os.write(2, f"\nhorse-jax: {what} ({name}); no output folder was finished\n".encode())
    os._exit(EXIT_CODES.get(signum, 128 + signum))


def _watch(fd: int) -> None:
  while True:
    data = os.read(fd, 64)
    if not data:
      return
    for signum in data:
      if signum in EXIT_CODES:
        _leave(signum)


def install_signal_handlers() -> None:
  """SIGINT/SIGTERM -> `_leave` on a watcher thread (see the module docstring). Main thread only."""
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in EXIT_CODES:
    # The Python-level handler only keeps Python from raising KeyboardInterrupt; the C-level
    # handler has already written the signal number to the wakeup fd the watcher reads.
    signal.signal(signum, lambda *_: None)
  threading.Thread(target=_watch, args=(read_fd,), name="horse-jax-signals", daemon=True).start()


def _leave_lost_peer(err: BaseException) -> None:
  """A collective failed because a peer process went away: wait for the coordination service to
  name it (`lost_process`), else say what failed in one line; exit without the interpreter's
  teardown, whose distributed shutdown would wait minutes for the lost process. Returns when `err`
  is another failure."""
  from horse_jax import distributed, outputs  # noqa: PLC0415
  from horse_jax.cli import lost_process  # noqa: PLC0415
  line = lost_process.wait_for_verdict(err, distributed.HEARTBEAT_TIMEOUT_S + 15)
  if line is None:
    return
  outputs.discard_pending()
  sys.stdout.flush()
  os.write(2, f"horse-jax: error: {line}\n".encode())
  os._exit(1)


def main(argv: list[str] | None = None, handle_signals: bool | None = None) -> int:
  """Runs one command.

  Args:
    argv: the arguments (default sys.argv[1:]).
    handle_signals: install the SIGINT/SIGTERM handlers (default: when run as the console script,
      i.e. argv is None; in-process callers such as tests keep their own handlers).

  Returns:
    The exit code.
  """
  if handle_signals is None:
    handle_signals = argv is None
  # XLA's CPU Cholesky / triangular solves (the hypernetwork editors' ridge solves) call LAPACK from
  # the OpenBLAS that scipy bundles, whose worker threads spin against XLA's thread pool: on a
  # 2-core machine a 768 x 768 factorization then takes ~0.5 s instead of a few ms. OpenBLAS reads
  # the variable when it loads (at the first LAPACK call, after this), and a value set by the user
  # wins. Set here, in the command's own process; the library sets no variable.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  if handle_signals:
    install_signal_handlers()
    silence_third_party()
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 1
  from horse_jax import progress  # noqa: PLC0415
  progress.configure(quiet=getattr(args, "quiet", False))
  multihost = bool(getattr(args, "coordinator", None) or getattr(args, "distributed", None))
  if handle_signals and multihost:
    from horse_jax.cli import lost_process  # noqa: PLC0415
    lost_process.start(getattr(args, "process_id", None), getattr(args, "coordinator", None))
    # The distributed runtime's preemption notifier replaces the SIGTERM handler at
    # `jax.distributed.initialize` (a TPU maintenance notice), which would make SIGTERM a no-op
    # here: this command never asks for a preemption sync point, so it keeps its own handler.
    import jax  # noqa: PLC0415
    jax.config.update("jax_enable_preemption_service", False)
  try:
    return int(args.func(args) or 0)
  except UserError as err:
    print(f"horse-jax: error: {err}", file=sys.stderr)
    return 2
  except BrokenPipeError:  # stdout closed early (`horse-jax info ... | head`): not an error to report
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), sys.stdout.fileno())
    return 0
  except KeyboardInterrupt:  # in-process callers without the handlers above
    print("horse-jax: interrupted", file=sys.stderr)
    return 130
  except Exception as err:  # noqa: BLE001  (only a lost peer in a multi-host run is handled here)
    if not (handle_signals and multihost):
      raise
    _leave_lost_peer(err)
    raise


if __name__ == "__main__":
  sys.exit(main())
