"""`horse-jax plan`: per-device memory and FLOPs of each editing stage, compiled without weights.

  horse-jax plan --model models/llama-3-8b --method horse --n-edits 8000 --mesh 1x8 [--json]

Only config.json is read. On a CPU-only host the requested mesh is made of forced CPU devices.
"""

from __future__ import annotations

import json

from horse_jax.errors import UserError


def register(sub) -> None:
  p = sub.add_parser("plan", help="per-device memory and FLOPs of each stage (compiled, no weights)")
  p.add_argument("--model", required=True, help="folder with config.json, or a model card name")
  p.add_argument("--method", required=True, choices=("horse", "malmen", "mend", "horen", "grace"))
  p.add_argument("--n-edits", type=int, required=True,
                 help="edits at once (horse/malmen/mend) or codebook entries (horen/grace)")
  p.add_argument("--mesh", default="1x1", metavar="DATAxMODEL", help="device mesh [1x1]")
  from horse_jax.cli.common import add_dtype_arg, add_fsdp_arg
  add_dtype_arg(p)
  add_fsdp_arg(p, "default off")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help="override a setting, e.g. --set editor.rank=1920 (repeatable)")
  p.add_argument("--answer-tokens", type=int, default=3, help="cached rows per edit [3, ZsRE's mean]")
  p.add_argument("--seq-len", type=int, default=32, help="tokens of one padded edit [32]")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.set_defaults(func=run)


def ensure_cpu_devices(n: int) -> None:
  """Forces n CPU devices when JAX's backends are not up yet (harmless where an accelerator runs)."""
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return
  try:
    current = int(jax.config.jax_num_cpu_devices)
  except (AttributeError, TypeError, ValueError):
    current = -1
  if current < n:
    jax.config.update("jax_num_cpu_devices", n)


def plan_devices(n: int):
  """n devices of the default backend, else n (forced) CPU devices; UserError when neither has them."""
  import jax
  if len(jax.devices()) >= n:
    return jax.devices()[:n]
  cpus = jax.devices("cpu")
  if len(cpus) >= n:
    return cpus[:n]
  raise UserError(f"--mesh needs {n} devices; {len(jax.devices())} available (JAX started before "
                  f"plan could force {n} CPU devices)")


def run(args) -> int:
  from horse_jax import distributed, plan
  from horse_jax.models.sharding import make_mesh
  shape = distributed.parse_mesh(args.mesh) or (1, 1)
  if args.answer_tokens < 1 or args.seq_len < 2:
    raise UserError("--answer-tokens must be >= 1 and --seq-len >= 2")
  ensure_cpu_devices(shape[0] * shape[1])
  mesh = make_mesh(shape[0], shape[1], plan_devices(shape[0] * shape[1]))
  result = plan.plan(args.model, args.method, args.n_edits, mesh, args.dtype, args.overrides,
                     fsdp=bool(args.fsdp), answer_tokens=args.answer_tokens, seq_len=args.seq_len)
  if args.json:
    print(json.dumps(result))
  else:
    print(plan.markdown(result), end="")
  return 0
