"""`horse-jax eval`: run an evaluation sweep (methods x numbers of edits x seeds) from a YAML file.

  horse-jax eval --config eval/world.yaml [--out DIR] [--set n_edits=[1,10]] [--skip-invalid]
  horse-jax eval --model M --data D --method unedited --n-edits 1 10   (a sweep without a file)

Writes DIR/results.json, DIR/results.md, DIR/plots/*.png and DIR/cells/**.json (all atomically).
Multi-host (`--coordinator/--num-processes/--process-id` or `--distributed auto`): every process runs
the same sweep on the global mesh; process 0 alone writes the outputs, prints and shows progress.
"""

from __future__ import annotations

import os

from horse_jax.errors import UserError


def register(sub) -> None:
  p = sub.add_parser("eval", help="evaluation sweep: methods x numbers of edits x seeds -> tables and plots")
  p.add_argument("--config", default=None, help="sweep YAML (see eval/README.md)")
  p.add_argument("--out", default=None, help="output folder (default eval/results/<name>)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help="override sweep settings, e.g. --set seeds=[0,1,2] n_edits=[1,10] (repeatable)")
  p.add_argument("--model", default=None, help="model folder (overrides the YAML's `model`)")
  p.add_argument("--data", default=None, help="edit records (overrides the YAML's `data`)")
  p.add_argument("--method", dest="methods", action="append", default=None,
                 help="method to evaluate (repeatable; overrides the YAML's `methods`)")
  p.add_argument("--n-edits", type=int, nargs="+", default=None, help="numbers of edits")
  p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds")
  p.add_argument("--eval", dest="eval_mode", choices=("teacher", "generate"), default=None,
                 help="teacher-forced scores only, or also greedy generation")
  p.add_argument("--skip-invalid", action="store_true", help="report and skip malformed records")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  from horse_jax.cli.common import add_device_args
  add_device_args(p)
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax.eval import sweep  # noqa: PLC0415  (heavy imports only when the command runs)
  if args.config is None and (args.model is None or args.data is None):
    raise UserError("eval: give --config, or --model and --data")
  settings = sweep.resolve_settings(args.config, args.overrides)
  for key, value in (("model", args.model), ("data", args.data), ("methods", args.methods),
                     ("n_edits", args.n_edits), ("seeds", args.seeds)):
    if value is not None:
      settings[key] = value
  if args.eval_mode:
    settings["eval"]["mode"] = args.eval_mode
  if args.skip_invalid:
    settings["skip_invalid"] = True
  from horse_jax.cli.common import setup_devices
  from horse_jax import distributed
  model = settings.get("model")
  mesh, fsdp = setup_devices(args, model[0] if isinstance(model, (list, tuple)) and model else model)
  out = args.out or os.path.join("eval", "results", sweep.slug(settings["name"]))
  main = distributed.is_main()
  results = sweep.run_sweep(settings, out, progress=main and not args.quiet, write=main, mesh=mesh,
                            fsdp=fsdp)
  distributed.main_print(f"wrote {os.path.join(out, 'results.md')} ({len(results['cells'])} cells, "
        f"{len(results['plots'])} plot(s))")
  return 0
