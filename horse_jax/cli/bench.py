"""`horse-jax bench`: time the hot paths and write markdown + JSON tables.

The benchmarks are not part of the library: they live in the top-level `benchmarks/` folder of a
source checkout, next to the `horse_jax/` package this command runs from (`pip install -e .` of a
clone), and are imported from there.
"""

from __future__ import annotations

import importlib
import os
import sys

from horse_jax.errors import UserError


def _checkout_root() -> str:
  import horse_jax
  return os.path.dirname(os.path.dirname(os.path.abspath(horse_jax.__file__)))


def load_suite():
  """The `benchmarks.suite` module of the checkout horse_jax runs from.

  Raises:
    UserError: horse_jax is not run from a source checkout (e.g. installed from a wheel).
  """
  root = _checkout_root()
  folder = os.path.join(root, "benchmarks")
  if not os.path.isfile(os.path.join(folder, "suite.py")):
    raise UserError(f"horse-jax bench runs the benchmarks of a source checkout, and {folder} does "
                    "not exist: run it from a clone installed with `pip install -e .`")
  if root not in sys.path:
    sys.path.insert(0, root)
  suite = importlib.import_module("benchmarks.suite")
  if os.path.dirname(os.path.abspath(suite.__file__)) != folder:
    raise UserError(f"another `benchmarks` package ({suite.__file__}) shadows {folder}")
  return suite


def register(sub) -> None:
  p = sub.add_parser("bench", help="benchmark forward, generation, ridge solve, retrieval and edits "
                                   "(from a source checkout)")
  p.add_argument("--out", default="runs/bench", help="output folder [runs/bench]")
  p.add_argument("--only", action="append", default=[], metavar="NAME",
                 help="run only these benchmarks (repeatable; names in benchmarks/suite.py "
                      "BENCHMARKS); horen_world_50k runs only when named")
  p.add_argument("--world", default=None, help="world folder [checkpoints/world]")
  p.add_argument("--reference", action="store_true",
                 help="add reference-scale shapes (needs an accelerator's memory and speed)")
  p.add_argument("--reference-code", default=None, metavar="DIR",
                 help="a checkout of the HoReN reference repository (github ha11ucin8/HoReN; or "
                      "HORSE_JAX_REFERENCE_CODE): the reference_* benchmarks time its editors "
                      "against ours (needs torch); without it their rows say they need it")
  p.add_argument("--reference-edits", type=int, default=5, metavar="N",
                 help="reference_*: edits timed per side, after one untimed [5]")
  p.add_argument("--reference-steps", type=int, default=None, metavar="N",
                 help="reference_*: a reduced iteration count (n_iter, v_num_grad_steps) for both "
                      "sides alike [the hparams files']")
  from horse_jax.cli.common import add_mesh_args, add_overwrite_arg
  add_overwrite_arg(p)
  add_mesh_args(p)
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax import outputs
  from horse_jax.io import atomic_write_json, atomic_write_text
  from horse_jax.cli.common import setup_devices
  outputs.prepare_output(args.out, inputs={"--world": args.world}, overwrite=args.overwrite)
  bench = load_suite()
  from benchmarks import reference  # noqa: PLC0415  (importable once the suite is)
  from benchmarks.reference import shim  # noqa: PLC0415
  code_dir = reference.code_dir(args.reference_code)
  if code_dir:
    try:
      shim.check_checkout(code_dir)
    except FileNotFoundError as err:
      raise UserError(f"--reference-code: {err}") from None
  if args.reference_edits < 1:
    raise UserError(f"--reference-edits {args.reference_edits}: at least 1")
  if args.reference_steps is not None and args.reference_steps < 1:
    raise UserError(f"--reference-steps {args.reference_steps}: at least 1")
  # Without a checkout the reference_* rows only say that they need one.
  names = args.only or [n for n in bench.BENCHMARKS if n not in bench.ON_REQUEST]
  unknown = [n for n in names if n not in bench.BENCHMARKS]
  if unknown:
    raise UserError(f"unknown benchmark {unknown[0]!r} (known: {', '.join(bench.BENCHMARKS)})")
  mesh, fsdp = setup_devices(args, args.world and os.path.join(args.world, "model"))
  rows = bench.run(names, args.world, args.reference, mesh=mesh, fsdp=fsdp,
                   reference_options={"code_dir": code_dir, "edits": args.reference_edits,
                                      "steps": args.reference_steps})
  device = bench.device_description()
  table = bench.markdown(rows, device)
  with outputs.output_folder(args.out, overwrite=args.overwrite, manifest={"command": "bench"}) as out:
    atomic_write_text(os.path.join(out, "bench.md"), table)
    atomic_write_json(os.path.join(out, "bench.json"), {"device": device, "rows": rows})
  print(table)
  print(f"wrote {args.out}/bench.md and bench.json")
  return 0
