"""`horse-jax eval`: run an evaluation sweep (methods x numbers of edits x seeds) from a YAML file.

  horse-jax eval --config eval/world.yaml [--out DIR] [--set n_edits=[1,10]] [--skip-invalid]
  horse-jax eval --model M --data D --method unedited --n-edits 1 10   (a sweep without a file)

Writes DIR/results.json, DIR/results.md, DIR/curve.jsonl, DIR/plots/*.png, DIR/curves/*.png and
DIR/cells/**.json. A new DIR (or one holding this same sweep: DIR/sweep.json has these settings) is
written in place, and a re-run after an interruption (kill -9 included) resumes it: finished cells
are kept and sequential streams continue from their last finished checkpoint; the manifest, written
last, marks it finished. A DIR holding anything else is refused; --overwrite starts over: a new
sweep is built beside DIR and swapped in whole at the end.
Multi-host (`--coordinator/--num-processes/--process-id` or `--distributed auto`): every process runs
the same sweep on the global mesh; process 0 alone writes the outputs, prints and shows progress.
"""

from __future__ import annotations

import contextlib
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
  p.add_argument("--report", action="store_true",
                 help="edit nothing: write results.md and the plots of the cells a stopped sweep in "
                      "--out finished (the same command without --report resumes it)")
  from horse_jax.cli.common import add_device_args, add_dtype_arg, add_overwrite_arg
  add_dtype_arg(p, "default the YAML's dtype, else float32")
  add_overwrite_arg(p)
  add_device_args(p)
  p.set_defaults(func=run)


def _inputs(settings) -> dict:
  """{name: path} of the sweep's models, data files and hypernetworks (--out may not overlap them)."""
  found = {}
  for key in ("model", "data"):
    values = settings.get(key)
    for i, path in enumerate(values if isinstance(values, (list, tuple)) else [values]):
      found[f"{key}[{i}]" if i else f"--{key}"] = path
  for entry in settings.get("methods") or ():
    if isinstance(entry, dict) and entry.get("hypernet"):
      found[f"methods.{entry.get('label', entry.get('name'))}.hypernet"] = entry["hypernet"]
  return found


def run(args) -> int:
  from horse_jax import outputs, progress  # noqa: PLC0415
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
  if args.dtype:
    settings["dtype"] = args.dtype
  from horse_jax.cli.common import setup_devices
  from horse_jax import distributed
  model = settings.get("model")
  mesh, fsdp = setup_devices(args, model[0] if isinstance(model, (list, tuple)) and model else model)
  out = args.out or os.path.join("eval", "results", sweep.slug(settings["name"]))
  outputs.check_inputs(out, _inputs(settings))
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out}: is a file, not a folder")
  same = sweep.folder_holds(out, settings)
  if same is False and not args.overwrite:
    raise UserError(f"--out {out}: holds something other than this sweep (a sweep folder resumes only "
                    "with the same settings; add --overwrite to replace it, or choose another folder)")
  main = distributed.is_main()
  if args.report:
    if main:
      results = sweep.report(settings, out)
      print(f"wrote {os.path.join(out, 'results.md')} ({len(results['cells'])} finished cells of an "
            "unfinished sweep)")
    return 0

  def run_in(folder, resume):
    with progress.stage(f"sweep {settings['name']}"):
      return sweep.run_sweep(settings, folder, progress=main and progress.bars_enabled(), write=main,
                             mesh=mesh, fsdp=fsdp, resume=resume)

  if same is False or (same and args.overwrite):
    # --overwrite starts over: built beside and swapped in whole, like every other command.
    with outputs.output_folder(out, overwrite=True, active=main, manifest={"command": "eval"}) as tmp:
      results = run_in(tmp or out, resume=False)
  else:
    if main and os.path.isdir(out):  # a resumed sweep is unfinished until it ends
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, outputs.MANIFEST))
    results = run_in(out, resume=True)
    distributed.barrier("eval:done")
    if main:
      outputs.apply_umask_tree(out)
      outputs.write_manifest(out, {"command": "eval"})
  distributed.main_print(f"wrote {os.path.join(out, 'results.md')} ({len(results['cells'])} cells, "
        f"{len(results['plots'])} plot(s), curve.jsonl)")
  return 0
