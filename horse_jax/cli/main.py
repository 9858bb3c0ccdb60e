"""Entry point of the `horse-jax` console script.

Each sub-command lives in its own module exposing `register(subparsers)`, which adds a parser whose
`func(args) -> int` runs it. Errors a user can cause (`UserError`) end with one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="horse-jax",
      description="Knowledge editing for LLMs in JAX: HORSE, MALMEN, MEND, HoReN, GRACE.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMANDS:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as err:
      if err.name == name:
        continue
      raise
    module.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  # XLA's CPU Cholesky / triangular solves (the hypernetwork editors' ridge solves) call LAPACK from
  # the OpenBLAS that scipy bundles, whose worker threads spin against XLA's thread pool: on a
  # 2-core machine a 768 x 768 factorization then takes ~0.5 s instead of a few ms. OpenBLAS reads
  # the variable when it loads (at the first LAPACK call, after this), and a value set by the user
  # wins. Set here, in the command's own process; the library sets no variable.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 1
  try:
    return int(args.func(args) or 0)
  except UserError as err:
    print(f"horse-jax: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("horse-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
