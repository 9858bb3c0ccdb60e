"""`horse-jax edit`: apply edits with any method; dispatches to the method family's runner.

horse / malmen / mend -> `edit_hypernet.run(args, mesh, fsdp)` (all edits at once)
horen / grace         -> `edit_codebook.run(args, mesh, fsdp)` (edits one after another)
UnKE data             -> `edit_unke.run(args, mesh, fsdp)`
The mesh of --mesh/--fsdp is built here, once, and passed down.
"""

from __future__ import annotations

import importlib

from horse_jax.errors import UserError

HYPERNET_METHODS = ("horse", "malmen", "mend")
CODEBOOK_METHODS = ("horen", "grace")


def register(sub) -> None:
  p = sub.add_parser("edit", help="edit a model with HORSE/MALMEN/MEND (at once) or HoReN/GRACE (sequentially)")
  p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
  p.add_argument("--data", required=True, help="edit records (ZsRE/MEND, CounterFact, WikiBigEdit or generic JSON/JSONL)")
  p.add_argument("--method", required=True, choices=HYPERNET_METHODS + CODEBOOK_METHODS)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--n-edits", type=int, default=None, help="edit the first N records (file order); default all")
  p.add_argument("--hypernet", default=None, help="trained hypernetwork folder (horse/malmen/mend); fresh if absent")
  p.add_argument("--codebook", default=None, help="codebook folder to continue editing (horen/grace)")
  from horse_jax.cli.settings_args import add_settings_args
  add_settings_args(p, "editor.lr=1e-5 data.batch_size=16")
  p.add_argument("--eval", dest="eval_mode", choices=("teacher", "generate"), default="teacher",
                 help="scoring: teacher-forced token accuracy, or also greedy generation")
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="(UnKE data) greedy generation budget per prompt (default 512, cut to the context)")
  p.add_argument("--eval-every", type=int, default=0,
                 help="(horen/grace) re-score all edits so far every K edits")
  p.add_argument("--skip-invalid", action="store_true", help="report and skip malformed records")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="LM dtype (default from the model card)")
  p.add_argument("--seed", type=int, default=0)
  from horse_jax.cli.common import add_device_args
  add_device_args(p)
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax.cli.common import setup_devices
  mesh, fsdp = setup_devices(args, args.model)
  family = "edit_hypernet" if args.method in HYPERNET_METHODS else "edit_codebook"
  from horse_jax.data.unke import looks_like_unke  # noqa: PLC0415
  if looks_like_unke(args.data):  # unstructured edits: chat prompts, long targets, text metrics
    family = "edit_unke"
  try:
    module = importlib.import_module(f"horse_jax.cli.{family}")
  except ModuleNotFoundError as err:
    if err.name == f"horse_jax.cli.{family}":
      raise UserError(f"method {args.method!r} is not available in this build") from None
    raise
  return module.run(args, mesh=mesh, fsdp=fsdp)
