"""`horse-jax train`: meta-train a HORSE / MALMEN / MEND hypernetwork.

Each step draws N = data.n_edits training records (a pure function of (seed, step), so a resumed run
sees exactly the data an uninterrupted run would), predicts shifts, and takes one Adam step on the
decoupled meta-gradient. Per-step metrics are appended to OUT/metrics.jsonl; orbax checkpoints go to
OUT/checkpoints every --save-every steps; re-running the same command resumes from the latest one.
The final hypernetwork is written to OUT/hypernet/ (what `horse-jax edit --hypernet` reads).

Multi-host (`--coordinator/--num-processes/--process-id` or `--distributed auto`): every process
reads the data and builds the same global batches, runs the same compiled meta-step on the global
mesh and takes part in orbax's saves of OUT/checkpoints and OUT/hypernet (OUT must be the same
folder on every host); process 0 alone writes run.json and metrics.jsonl, prints and shows progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from horse_jax import distributed, runtime
from horse_jax import progress as progress_lib
from horse_jax.cli.edit_common import resolve
from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import checkpoint as ckpt
from horse_jax.editors.hypernet import memo as memo_lib
from horse_jax.editors.hypernet.data import step_batches, step_indices  # noqa: F401  (re-exported)
from horse_jax.editors.hypernet.validation import validate
from horse_jax.cli.settings_args import add_settings_args
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_json, atomic_write_text


def register(sub) -> None:
  p = sub.add_parser("train", help="meta-train a HORSE/MALMEN/MEND hypernetwork")
  p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
  p.add_argument("--data", required=True, help="training edit records (needs rephrase and locality fields)")
  p.add_argument("--valid", default=None, help="held-out records for validation ES/GS/LS")
  p.add_argument("--method", required=True, choices=hypernet.config.METHODS)
  p.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, hypernet/)")
  add_settings_args(p, "data.n_edits=64 editor.rank=128")
  p.add_argument("--steps", type=int, default=None,
                 help="meta-training steps in total (default editor.n_epochs passes over --data)")
  p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps")
  p.add_argument("--valid-every", type=int, default=None, help="validate every K steps (default --save-every)")
  p.add_argument("--valid-n", type=int, default=None, help="validation edits at once (default data.n_edits)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-invalid", action="store_true", help="report and skip malformed records")
  from horse_jax.cli.common import add_device_args, add_dtype_arg, add_overwrite_arg
  add_dtype_arg(p)
  add_overwrite_arg(p)
  add_device_args(p)
  p.set_defaults(func=run)


def _truncate_metrics(path: str, step: int) -> None:
  """Keeps the metrics lines of steps <= `step` (a resumed run rewrites what came after)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):
        continue  # a half-written last line of a killed run
  atomic_write_text(path, "".join(kept))


def _memo(model, tokenizer, train, cfg, budget_mb: int, max_length, mesh, main: bool):
  """The memo of the training records' keys / value grads (`hypernet.memo`), or None when
  `editor.memo_cache_mb` is 0 or too small for it (each step then recomputes them)."""
  if budget_mb < 0:
    raise UserError(f"editor.memo_cache_mb must be >= 0, not {budget_mb}")
  fits, mib = memo_lib.plan(tokenizer, train, cfg, budget_mb, max_length)
  if not fits:
    if budget_mb > 0:
      distributed.main_print(f"memo of the training keys / value gradients: needs {mib:,.0f} MiB "
                             f"> editor.memo_cache_mb={budget_mb}; every step recomputes them")
    return None
  start = time.time()
  memo = memo_lib.build(model, tokenizer, train, cfg, max_length, mesh,
                        progress=main and progress_lib.bars_enabled())
  jax.block_until_ready(memo.arrays)
  distributed.main_print(f"memo of the training keys / value gradients: {len(train):,} records, "
                         f"{memo.n_slots:,} rows, {mib:,.1f} MiB per device, "
                         f"{time.time() - start:.1f} s")
  return memo


# run.json fields that make two runs "the same run" (a re-run with these equal resumes; --steps
# may grow).
SAME_RUN_KEYS = ("method", "model", "data", "valid", "seed", "effective_settings")


def _same_run(out: str, identity: dict) -> bool | None:
  """None: `out` is absent or empty (a new run); True: it holds a run with `identity`; False: it
  holds something else."""
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  try:
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  norm = lambda x: json.loads(json.dumps(x))  # noqa: E731  (tuples vs lists after a JSON round trip)
  return all(norm(saved.get(k)) == norm(identity.get(k)) for k in SAME_RUN_KEYS)


@contextlib.contextmanager
def _train_folder(args, identity: dict, main: bool):
  """The folder the run writes into. A new or same-settings folder is trained in place (a re-run
  resumes it; the manifest, written last, marks it finished); a folder holding something else is
  refused, or with --overwrite replaced by a run built beside it and swapped in at the end."""
  from horse_jax import distributed, outputs
  outputs.check_inputs(args.out, {"--model": args.model, "--data": args.data, "--valid": args.valid})
  same = _same_run(args.out, identity)
  if same is False and not getattr(args, "overwrite", False):
    raise UserError(f"--out {args.out}: holds something other than a training run with these "
                    "settings (add --overwrite to replace it, or choose another folder)")
  if same is False:
    if jax.process_count() > 1:
      raise UserError(f"--out {args.out}: multi-host train cannot --overwrite; remove it first")
    with outputs.output_folder(args.out, overwrite=True, manifest={"command": "train"}) as tmp:
      yield tmp
    return
  if main:
    os.makedirs(args.out, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # a resumed run is unfinished until it ends
      os.unlink(os.path.join(args.out, outputs.MANIFEST))
  yield args.out
  distributed.barrier("train:done")
  if main:
    outputs.apply_umask_tree(args.out)
    outputs.write_manifest(args.out, {"command": "train"})


def run(args) -> int:
  from horse_jax.cli.common import setup_devices
  if (args.steps is not None and args.steps < 1) or args.save_every < 1:
    raise UserError("--steps and --save-every must be >= 1")
  mesh, fsdp = setup_devices(args, args.model)
  return train(args, mesh, fsdp)


def train(args, mesh=None, fsdp: bool = False) -> int:
  """Meta-trains with the parsed `train` arguments on `mesh` (None: one device); `fsdp` also splits
  the LM's weights over `data`."""
  main = distributed.is_main()
  outs = distributed.gather_text(os.path.abspath(args.out))
  if len(set(outs)) > 1:  # orbax saves collectively: every process must write into the same folder
    raise UserError(f"multi-host train: --out must be the same folder on every process, got {outs}")
  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")
  from horse_jax.models import read_config
  resolved = resolve(args, read_config(args.model))
  identity = {"method": args.method, "model": args.model, "data": args.data, "valid": args.valid,
              "seed": args.seed, "effective_settings": resolved.effective()}
  with _train_folder(args, identity, main) as out:
    return _train(args, out, resolved, mesh, fsdp, main)


def _train(args, out: str, resolved, mesh, fsdp: bool, main: bool) -> int:
  from horse_jax import progress
  from horse_jax.data.loaders import load_records
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh, fsdp=fsdp)
  cfg = hypernet.from_settings(args.method, resolved, model)
  settings = resolved.tree()
  settings["model"]["edit_modules"] = list(cfg.modules)
  max_length = settings["data"].get("max_length")
  train = load_records(args.data, skip_invalid=getattr(args, "skip_invalid", False))
  n_edits = int(settings["data"]["n_edits"])
  if n_edits > len(train):
    raise UserError(f"data.n_edits={n_edits} exceeds the {len(train)} records of {args.data}")
  if args.steps is None:
    args.steps = max(int(settings["editor"]["n_epochs"]) * (-(-len(train) // n_edits)), 1)
  valid = load_records(args.valid, limit=args.valid_n or n_edits,
                       skip_invalid=getattr(args, "skip_invalid", False)) if args.valid else []
  valid_every = args.valid_every or args.save_every

  if main:
    atomic_write_json(os.path.join(out, "run.json"),
                      {"method": args.method, "model": args.model, "data": args.data, "valid": args.valid,
                       "seed": args.seed, "steps": args.steps, "settings": settings, "config": cfg.to_dict(),
                       "effective_settings": resolved.effective(), "ignored_settings": resolved.ignored})
  distributed.barrier("train:out")  # the folder exists before orbax looks at it from other processes
  mgr = ckpt.manager(os.path.join(out, "checkpoints"))
  # Multi-host: a global array replicated on the mesh (orbax saves those once, restores into them).
  template = distributed.replicate(hypernet.init(cfg, jax.random.PRNGKey(args.seed)),
                                   mesh if jax.process_count() > 1 else None)
  try:
    state = ckpt.restore_latest(mgr, template)
  except (ValueError, KeyError) as err:
    raise UserError(f"{args.out}/checkpoints: does not match this model/settings ({err})") from None
  start = 0 if state is None else int(distributed.to_host(state.step))
  state = template if state is None else state
  metrics_path = os.path.join(out, "metrics.jsonl")
  if main:
    _truncate_metrics(metrics_path, start)
  if start:
    distributed.main_print(f"resuming from step {start}")

  # Steps are dispatched asynchronously: while step t runs, the host tokenizes and packs step t + 1
  # (tokenizations are memoized across steps) and only then fetches step t's metrics. A step's
  # "seconds" is the time between two consecutive metric fetches (steady-state time per step).
  step_tok = hypernet.data.MemoTokenizer(tokenizer)
  packer = hypernet.Packer(cfg.chunk, 8 if mesh is None else max(8, mesh.shape["data"]))
  memo = _memo(model, step_tok, train, cfg, int(settings["editor"]["memo_cache_mb"]), max_length,
               mesh, main)
  last = [time.time()]

  def finish(step, metrics, log, bar, extra=None):
    try:  # every process checks (all stop together); multi-host: the values are gathered first
      m = hypernet.check_metrics(distributed.tree_to_host(metrics))
    except FloatingPointError:
      raise UserError(f"non-finite meta-training loss at step {step + 1}; last good checkpoint: "
                      f"step {mgr.latest_step()} in {args.out}/checkpoints") from None
    now = time.time()
    row = {"step": step + 1, **m, "seconds": round(now - last[0], 3), **(extra or {})}
    last[0] = now
    if log is not None:
      log.write(json.dumps(row) + "\n")
      log.flush()
    bar.set_postfix(gen=f"{m['gen_loss']:.3f}", loc=f"{m['loc_loss']:.3f}")

  with (open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext()) as log:
    bar = progress.bar(range(start, args.steps), initial=start, total=args.steps,
                       desc=f"train {args.method}", unit="step", disable=not main)
    started = time.time()
    pending = None
    for step in bar:
      indices = step_indices(args.seed, step, len(train), n_edits)
      records = [train[i] for i in indices]
      batches = step_batches(step_tok, records, cfg, max_length)
      rows = None if memo is None else memo_lib.step_rows(memo, step_tok, indices, records, cfg,
                                                          max_length, batches=batches[0])
      state, m = hypernet.train_step_async(state, model, cfg, *batches, mesh=mesh, packer=packer,
                                           memo_rows=rows, memo=memo)
      if pending is not None:
        finish(*pending, log, bar)
      pending = (step, m)
      do_valid = bool(valid) and (step + 1) % valid_every == 0
      if do_valid or (step + 1) % args.save_every == 0 or step + 1 == args.steps:
        extra = None
        if do_valid:
          jax.block_until_ready(m)
          state, v = validate(state, model, tokenizer, cfg, valid, max_length, mesh)
          extra = {f"valid_{k}": x for k, x in v.items()}
        finish(*pending, log, bar, extra)
        pending = None
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
          ckpt.save_step(mgr, state)
  if main and not progress.bars_enabled():
    progress.log(f"training {args.steps - start} steps: {time.time() - started:.1f} s")
  ckpt.save_hypernet(os.path.join(out, "hypernet"), cfg, state, settings)
  distributed.main_print(f"hypernetwork -> {os.path.join(args.out, 'hypernet')}")
  return 0
