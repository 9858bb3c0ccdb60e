"""`horse-jax plan`: per-device memory, FLOPs and collectives of each editing stage, compiled
without weights.

  horse-jax plan --model models/llama-3-8b --method horse --n-edits 8000 --mesh 1x8 [--json]
  horse-jax plan --model FOLDER --method horen --n-edits 50000 --data zsre.json   (token shapes)

Only config.json is read (and the tokenizer with --data). On a host with fewer devices than the
mesh, the mesh is made of forced CPU devices and the output says so.
"""

from __future__ import annotations

import json

from horse_jax import settings as settings_lib
from horse_jax.errors import UserError


def register(sub) -> None:
  p = sub.add_parser("plan", help="per-device memory, FLOPs and collectives of each stage (compiled, no weights)")
  p.add_argument("--model", required=True, help="folder with config.json, or a model card name")
  p.add_argument("--method", required=True, choices=settings_lib.METHODS)
  p.add_argument("--n-edits", type=int, required=True,
                 help="edits at once (horse/malmen/mend) or codebook entries (horen/grace)")
  p.add_argument("--mesh", default="1x1", metavar="DATAxMODEL", help="device mesh [1x1]")
  from horse_jax.cli.common import add_dtype_arg, add_fsdp_arg
  add_dtype_arg(p)
  add_fsdp_arg(p, "default off")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help="override a setting, e.g. --set editor.rank=1920 (repeatable)")
  p.add_argument("--data", default=None,
                 help="edit records to take the token shapes from (the first --n-edits records, "
                      "tokenized with the model folder's tokenizer); --seq-len / --answer-tokens "
                      "given too win over it")
  p.add_argument("--tokenizer", default=None, metavar="DIR",
                 help="tokenizer folder for --data [the --model folder]")
  p.add_argument("--answer-tokens", type=int, default=None,
                 help="cached rows per edit [from --data, else 3, ZsRE's mean]")
  p.add_argument("--seq-len", type=int, default=None,
                 help="tokens of one padded edit [from --data, else 32]")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax import meshes, plan
  if (args.answer_tokens is not None and args.answer_tokens < 1) or (
      args.seq_len is not None and args.seq_len < 2):
    raise UserError("--answer-tokens must be >= 1 and --seq-len >= 2")
  mesh = meshes.planning_mesh(args.mesh)
  result = plan.plan(args.model, args.method, args.n_edits, mesh, args.dtype, args.overrides,
                     fsdp=bool(args.fsdp), answer_tokens=args.answer_tokens, seq_len=args.seq_len,
                     data=args.data, tokenizer=args.tokenizer)
  if args.json:
    print(json.dumps(result))
  else:
    print(plan.markdown(result), end="")
  return 0
