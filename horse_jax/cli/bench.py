"""`horse-jax bench`: time the hot paths and write markdown + JSON tables."""

from __future__ import annotations

import os

from horse_jax.errors import UserError


def register(sub) -> None:
  from horse_jax.bench import BENCHMARKS
  p = sub.add_parser("bench", help="benchmark forward, generation, ridge solve, retrieval and edits")
  p.add_argument("--out", default="runs/bench", help="output folder [runs/bench]")
  p.add_argument("--only", action="append", default=[], choices=sorted(BENCHMARKS),
                 help="run only these benchmarks (repeatable); horen_world_50k runs only when named")
  p.add_argument("--world", default=None, help="world folder [checkpoints/world]")
  p.add_argument("--reference", action="store_true",
                 help="add reference-scale shapes (needs an accelerator's memory and speed)")
  from horse_jax.cli.common import add_mesh_args
  add_mesh_args(p)
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax import bench
  from horse_jax.io import atomic_write_json, atomic_write_text
  from horse_jax.cli.common import setup_devices
  setup_devices(args, args.world and os.path.join(args.world, "model"))
  names = args.only or [n for n in bench.BENCHMARKS if n not in getattr(bench, "ON_REQUEST", ())]
  unknown = [n for n in names if n not in bench.BENCHMARKS]
  if unknown:
    raise UserError(f"unknown benchmark {unknown[0]!r}")
  rows = bench.run(names, args.world, args.reference)
  device = bench.device_description()
  table = bench.markdown(rows, device)
  os.makedirs(args.out, exist_ok=True)
  atomic_write_text(os.path.join(args.out, "bench.md"), table)
  atomic_write_json(os.path.join(args.out, "bench.json"), {"device": device, "rows": rows})
  print(table)
  print(f"wrote {args.out}/bench.md and bench.json")
  return 0
