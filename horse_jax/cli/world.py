"""`horse-jax world`: build (or describe) the embedded default world and its pre-trained model.

  horse-jax world build [--out DIR] [--seed S]   regenerate data + tokenizer + model from a seed
                                                 (an existing DIR is refused unless --overwrite)
  horse-jax world info [--dir DIR]               sizes and accuracies of a built world
  horse-jax world edits --n N --seed S --out FILE [--world DIR]
                                                 N distinct edit requests about new subjects (ZsRE
                                                 records, the format `edit --data` and sweeps read);
                                                 an existing FILE is refused unless --overwrite
"""

from __future__ import annotations

import json
import os

from horse_jax.errors import UserError


def register(sub) -> None:
  from horse_jax.cli.common import add_overwrite_arg
  p = sub.add_parser("world", help="build or describe the embedded default world (synthetic facts + small Llama)")
  wsub = p.add_subparsers(dest="world_command", metavar="ACTION")
  b = wsub.add_parser("build", help="generate the world, train its tokenizer and pre-train its model")
  b.add_argument("--out", default=os.path.join("checkpoints", "world"),
                 help="output folder (default checkpoints/world, the shipped copy)")
  b.add_argument("--seed", type=int, default=0, help="world, tokenizer-data and model seed")
  b.add_argument("--steps", type=int, default=None, help="pre-training steps (default from PretrainConfig)")
  b.add_argument("--eval-every", type=int, default=500,
                 help="log sample accuracies every N steps (0: never)")
  add_overwrite_arg(b)
  b.set_defaults(func=run_build)
  i = wsub.add_parser("info", help="print the sizes and accuracies of a built world")
  i.add_argument("--dir", default=None, help="world folder (default: the shipped checkpoints/world)")
  i.set_defaults(func=run_info)
  e = wsub.add_parser("edits", help="write N distinct edit requests about new subjects (a lifelong "
                                     "stream for sequential sweeps)")
  e.add_argument("--n", type=int, required=True, help="number of edit requests")
  e.add_argument("--seed", type=int, default=0, help="the stream's seed (the same seed writes the same file)")
  e.add_argument("--out", required=True, help="output JSON file (ZsRE records, one per line)")
  e.add_argument("--world", default=None,
                 help="world folder whose names are avoided and whose facts give locality prompts "
                      "(default: the shipped checkpoints/world)")
  add_overwrite_arg(e)
  e.set_defaults(func=run_edits)
  p.set_defaults(func=lambda args: p.print_help() or 1)


def run_build(args) -> int:
  import dataclasses

  from horse_jax.world import build, pretrain
  cfg = pretrain.PretrainConfig()
  if args.steps is not None:
    if args.steps < 1:
      raise UserError("--steps must be positive")
    cfg = dataclasses.replace(cfg, steps=args.steps)
  from horse_jax import outputs
  out = outputs.prepare_output(args.out, overwrite=args.overwrite)
  # Pre-training checkpoints live beside the folder, so an interrupted build resumes while the
  # folder itself is only ever swapped in whole.
  parent, name = os.path.split(out)
  ckpt_dir = os.path.join(parent, f".{name}.pretrain-ckpt")
  with outputs.output_folder(out, overwrite=args.overwrite, manifest={"command": "world build"}) as tmp:
    build.build(tmp, seed=args.seed, cfg=cfg, eval_every=args.eval_every, ckpt_dir=ckpt_dir)
  print(f"wrote {args.out}")
  return 0


def run_edits(args) -> int:
  from horse_jax import outputs, progress
  from horse_jax.io import atomic_write_text
  from horse_jax.world import generator
  from horse_jax.world.build import default_world_dir, load_world
  if args.n < 1:
    raise UserError("--n must be positive")
  folder = args.world or default_world_dir()
  out = outputs.prepare_output_file(args.out, inputs={"--world": folder}, overwrite=args.overwrite)
  world = load_world(folder)
  edits = generator.distinct_edits(world, args.n, seed=args.seed, progress=progress.bars_enabled())
  # One record per line: a 50,000-edit stream stays diffable and loads as one JSON list.
  lines = (json.dumps(generator.to_zsre(e), ensure_ascii=False) for e in edits)
  atomic_write_text(out, "[\n" + ",\n".join(lines) + "\n]\n")
  print(f"wrote {args.out} ({args.n:,} edit requests about {len({e['subject'] for e in edits}):,} new "
        f"subjects, seed {args.seed})")
  return 0


def run_info(args) -> int:
  from horse_jax.world.build import default_world_dir
  folder = args.dir or default_world_dir()
  path = os.path.join(folder, "world.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist (build it with `horse-jax world build --out {folder}`)")
  with open(path) as f:
    report = json.load(f)
  print(f"world: {folder}  seed {report['seed']}  subjects {report['world']['n_subjects']}")
  print(f"model: {report['n_params']:,} params, {report['model_bytes'] / 1e6:.1f} MB, vocab "
        f"{report['vocab_size']}, built in {report['build_wall_s']:.0f}s wall / "
        f"{report['build_cpu_s']:.0f}s CPU")
  for name, acc in report["accuracy"].items():
    print(f"  {name:32s} n={acc['n']:6d} full_answer={acc['full_answer_acc']:.4f} "
          f"token={acc['token_acc']:.4f} greedy={acc['greedy_exact']:.4f}")
  return 0
