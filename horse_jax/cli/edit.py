"""`horse-jax edit`: apply edits with any method; dispatches to the method family's runner.

horse / malmen / mend -> `edit_hypernet.run(args, mesh, fsdp)` (all edits at once)
horen / grace         -> `edit_codebook.run(args, mesh, fsdp)` (edits one after another)
ultraedit             -> `edit_ultraedit.run(args, mesh, fsdp)` (steps of editor.batch_size edits)
rome / memit / alphaedit -> `edit_locate.run(args, mesh, fsdp)` (weights, one edit after another)
defer / wise          -> `edit_wrapped.run(args, mesh, fsdp)` (edits one after another)
UnKE data             -> `edit_unke.run(args, mesh, fsdp)`
The mesh of --mesh/--fsdp is built here, once, and passed down.
"""

from __future__ import annotations

import importlib

from horse_jax.errors import UserError

from horse_jax.settings import CODEBOOK as CODEBOOK_METHODS, HYPERNET as HYPERNET_METHODS
from horse_jax.settings import LOCATE as LOCATE_METHODS
from horse_jax.settings import ULTRAEDIT as ULTRAEDIT_METHODS
from horse_jax.settings import WRAPPED as WRAPPED_METHODS


def register(sub) -> None:
  p = sub.add_parser("edit", help="edit a model with HORSE/MALMEN/MEND (at once), HoReN/GRACE or "
                     "ROME/MEMIT/AlphaEdit/DEFER/WISE (sequentially) or UltraEdit (batch after batch)")
  p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
  p.add_argument("--data", required=True, help="edit records (ZsRE/MEND, CounterFact, WikiBigEdit or generic JSON/JSONL)")
  p.add_argument("--method", required=True,
                 choices=HYPERNET_METHODS + CODEBOOK_METHODS + ULTRAEDIT_METHODS + LOCATE_METHODS
                 + WRAPPED_METHODS)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--n-edits", type=int, default=None, help="edit the first N records (file order); default all")
  p.add_argument("--hypernet", default=None, metavar="DIR|init",
                 help="(horse/malmen/mend, required) a trained hypernetwork folder (`horse-jax train` "
                      "writes OUT/hypernet), or `init` for a freshly initialised network seeded by --seed")
  p.add_argument("--codebook", default=None, help="(horen/grace) codebook folder to continue editing")
  p.add_argument("--stats-corpus", default=None, metavar="PATH",
                 help="(rome/memit/alphaedit) corpus of the second-moment statistics: a .txt (one text "
                      "a line), .json/.jsonl (strings or {text}) or a saved `datasets` folder; default "
                      "the world's pre-training text (cached under editor.stats_dir)")
  from horse_jax.cli.settings_args import add_settings_args
  add_settings_args(p, "editor.lr=1e-5 data.batch_size=16")
  p.add_argument("--eval", dest="eval_mode", choices=("teacher", "generate"), default="teacher",
                 help="scoring: teacher-forced token accuracy, or also greedy generation")
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="(UnKE data) greedy generation budget per prompt (default 512, cut to the context)")
  p.add_argument("--eval-every", type=int, default=None,
                 help="(horen/grace/defer/wise) re-score all edits so far every K edits")
  p.add_argument("--skip-invalid", action="store_true", help="report and skip malformed records")
  p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                 help="(methods that write OUT/model) split the edited checkpoint into safetensors files "
                      "of at most this size, e.g. 2GB, 500MB, 2GiB, plus model.safetensors.index.json "
                      "(transformers' max_shard_size) [5GB]")
  p.add_argument("--seed", type=int, default=0)
  from horse_jax.cli.common import add_device_args, add_dtype_arg, add_overwrite_arg
  add_dtype_arg(p)
  add_overwrite_arg(p)
  add_device_args(p)
  p.set_defaults(func=run)


# Flags that apply to one method family only: (flag, attribute, methods it applies to).
METHOD_FLAGS = (
    ("--hypernet", "hypernet", HYPERNET_METHODS),
    ("--codebook", "codebook", CODEBOOK_METHODS),
    ("--eval-every", "eval_every", CODEBOOK_METHODS + WRAPPED_METHODS),
    ("--max-new-tokens", "max_new_tokens", CODEBOOK_METHODS),
    ("--stats-corpus", "stats_corpus", LOCATE_METHODS),
    ("--max-shard-size", "max_shard_size", HYPERNET_METHODS + ULTRAEDIT_METHODS + LOCATE_METHODS),
)

HOW_TO_GET_A_HYPERNET = (
    "give --hypernet DIR, a trained hypernetwork (`horse-jax train --method {method} ... --out RUN` "
    "writes RUN/hypernet; `horse-jax demo` uses checkpoints/world/hypernet), or --hypernet init for a "
    "freshly initialised, untrained network seeded by --seed")


def check_choices(args) -> None:
  """Refuses what the user did not choose explicitly or what does not apply to --method."""
  for flag, attr, methods in METHOD_FLAGS:
    if getattr(args, attr, None) is not None and args.method not in methods:
      raise UserError(f"{flag} does not apply to --method {args.method} (only to {', '.join(methods)})")
  if args.method in HYPERNET_METHODS and not args.hypernet:
    raise UserError(f"edit --method {args.method} needs a hypernetwork: "
                    + HOW_TO_GET_A_HYPERNET.format(method=args.method))
  if args.n_edits is not None and args.n_edits < 1:
    raise UserError(f"--n-edits must be at least 1, got {args.n_edits}")
  if getattr(args, "max_shard_size", None) is not None:  # a bad size fails before the edit, not after
    from horse_jax.cli.common import max_shard_size_arg
    max_shard_size_arg(args.max_shard_size)


def output_inputs(args) -> dict:
  """{flag: path} of what `edit` reads, which --out may not overlap."""
  return {"--model": args.model, "--data": args.data, "--hypernet": args.hypernet,
          "--codebook": args.codebook, "--stats-corpus": getattr(args, "stats_corpus", None)}


def run(args) -> int:
  from horse_jax import outputs
  from horse_jax.cli.common import setup_devices
  from horse_jax.data.unke import looks_like_unke  # noqa: PLC0415
  unke = looks_like_unke(args.data)  # unstructured edits: chat prompts, long targets, text metrics
  if unke and args.method not in CODEBOOK_METHODS:
    raise UserError(f"--data {args.data}: UnKE (unstructured) records are edited with --method horen "
                    f"or grace, not {args.method}")
  check_choices(args)
  outputs.prepare_output(args.out, inputs=output_inputs(args), overwrite=args.overwrite)
  mesh, fsdp = setup_devices(args, args.model)
  family = ("edit_hypernet" if args.method in HYPERNET_METHODS else
            "edit_ultraedit" if args.method in ULTRAEDIT_METHODS else
            "edit_locate" if args.method in LOCATE_METHODS else
            "edit_wrapped" if args.method in WRAPPED_METHODS else "edit_codebook")
  if unke:
    family = "edit_unke"
  try:
    module = importlib.import_module(f"horse_jax.cli.{family}")
  except ModuleNotFoundError as err:
    if err.name == f"horse_jax.cli.{family}":
      raise UserError(f"method {args.method!r} is not available in this build") from None
    raise
  return module.run(args, mesh=mesh, fsdp=fsdp)
