"""Options shared by the commands that load a model: the device mesh and multi-host flags.

  add_mesh_args(parser)                 --mesh DATAxMODEL|auto, --fsdp/--no-fsdp
  add_dtype_arg(parser)                 --dtype float32|bfloat16|float16 (every command)
  add_overwrite_arg(parser)             --overwrite (every command that writes a folder)
  add_distributed_args(parser)          --coordinator, --num-processes, --process-id, --distributed
  mesh, fsdp = setup_devices(args, model_path)   joins the multi-host run, then
                                                 `horse_jax.meshes.device_mesh` of the flags
"""

from __future__ import annotations

import argparse
from typing import Any

from horse_jax import distributed, meshes


def add_mesh_args(p) -> None:
  p.add_argument("--mesh", default=None, metavar="DATAxMODEL",
                 help="device mesh, e.g. 2x4 (data x model) or auto (the model card's sharding.mesh, "
                      "else all devices on model); default one device (all devices when multi-host)")
  add_fsdp_arg(p, "default the card's sharding.fsdp, else auto: on when one tensor-parallel "
                 "replica takes over half a device's memory")


# One definition of the switches every command shares.
DTYPES = ("float32", "bfloat16", "float16")


def add_fsdp_arg(p, default_help: str) -> None:
  """--fsdp / --no-fsdp: a switch in every command (None when neither is given)."""
  p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                 help=f"also split weights over the data axis ({default_help})")


def add_dtype_arg(p, default_help: str = "default the model card's, else float32") -> None:
  """--dtype: the LM dtype, the same choices in every command."""
  p.add_argument("--dtype", choices=DTYPES, default=None, help=f"LM dtype ({default_help})")


def add_overwrite_arg(p) -> None:
  """--overwrite: replace an existing non-empty output folder (atomically, at the end)."""
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing non-empty output folder (the new one is built beside it "
                      "and swapped in at the end); an output overlapping an input is always refused")


def add_distributed_args(p) -> None:
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="multi-host: address of process 0's coordinator")
  p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, default=None, help="multi-host: index of this process")
  p.add_argument("--distributed", choices=("auto",), default=None,
                 help="multi-host with auto-detection by jax.distributed.initialize (TPU pods, SLURM)")


def add_device_args(p, multihost: bool = True) -> None:
  """--mesh and --fsdp, plus the multi-host flags (edit, train, eval: commands that run the same
  program on every process and write from process 0)."""
  add_mesh_args(p)
  if multihost:
    add_distributed_args(p)


def setup_devices(args, model_path: str | None = None):
  """Joins a multi-host run if asked, then builds the mesh of `--mesh` / `--fsdp`.

  Args:
    args: parsed arguments (missing attributes count as not given).
    model_path: checkpoint folder, for the card's `sharding.mesh` / `sharding.fsdp`.

  Returns:
    (mesh, fsdp): the mesh, or None for one device (no --mesh in a single process), and whether the
    weights also split over `data`; the command passes both down.
  """
  if distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                            getattr(args, "process_id", None), getattr(args, "distributed", None) == "auto"):
    distributed.agree(run_fingerprint(args))
  return meshes.device_mesh(getattr(args, "mesh", None), getattr(args, "fsdp", None), model_path)


# Arguments that may differ between the processes of one run: which process it is, how it shows
# progress, and --out (only process 0 writes; `train` checks its own --out separately).
PER_PROCESS_ARGS = ("process_id", "quiet", "out", "func")


def run_fingerprint(args) -> dict[str, Any]:
  """What every process of a multi-host run must agree on (`distributed.agree` adds the process
  count each one joined with): the command line (mesh, method, settings, inputs) less
  `PER_PROCESS_ARGS`, and the contents of the --config files."""
  values = {k: v for k, v in sorted(vars(args).items()) if k not in PER_PROCESS_ARGS}
  files = []
  for path in getattr(args, "config", None) or ():
    try:
      with open(path, "rb") as f:
        files.append(distributed.fingerprint_digest(f.read().decode("utf-8", "replace")))
    except OSError:
      files.append(None)  # reported by the command itself
  return {"arguments": values, "config_files": files}


def max_shard_size(args) -> int | str:
  """`edit --max-shard-size`, else transformers' default (`models.hf_io.DEFAULT_MAX_SHARD_SIZE`)."""
  from horse_jax.models.hf_io import DEFAULT_MAX_SHARD_SIZE
  return getattr(args, "max_shard_size", None) or DEFAULT_MAX_SHARD_SIZE


def max_shard_size_arg(text: str) -> int:
  """--max-shard-size in bytes (`models.hf_io.shard_size_bytes`).

  Raises:
    UserError: naming the flag, when the text is not a size.
  """
  from horse_jax.errors import UserError
  from horse_jax.models.hf_io import shard_size_bytes
  try:
    return shard_size_bytes(text)
  except UserError:
    raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None
