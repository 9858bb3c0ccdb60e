"""Device meshes of a run: from `--mesh` / `--fsdp` and the model card, or for planning.

  mesh, fsdp = device_mesh("2x4", "auto", model_path)   what a run passes to loading and editors
  hosts_mesh()                                          no --mesh across hosts: model within a host
  parse_mesh("2x4") -> (2, 4);  mesh_for("auto", card) -> Mesh
  planning_mesh("1x8")                                  a mesh to compile on (forced CPU devices)

A mesh has the axes (`data`, `model`) of `horse_jax.models.sharding`. It is always an explicit
argument (`runtime.load_model(path, mesh=..., fsdp=...)`, the editors' `mesh=`, `eval.sweep.run_sweep`'s
`mesh=`); nothing here remembers one. In a multi-host run call `distributed.initialize` first, so
that the mesh spans every process's devices.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax

from horse_jax.errors import UserError


def device_mesh(mesh: str | None = None, fsdp: str | bool | None = None,
                model_path: str | None = None, devices=None) -> tuple[Any, bool]:
  """The (data, model) mesh of a run and whether its weights also split over `data` (FSDP).

  Call after `distributed.initialize` (a multi-host run needs the global devices).

  Args:
    mesh: "DATAxMODEL" (e.g. "2x4"), "auto" (the model card's `sharding.mesh`, else every device on
      `model`), or None: one device in a single process, `hosts_mesh` across processes.
    fsdp: True / False / "true" / "false" / "auto"; None: the card's `sharding.fsdp`, else "auto" (on
      when one tensor-parallel replica of the weights takes over half a device's memory).
    model_path: the checkpoint folder, for its model card and its size (optional).
    devices: the devices to lay out (default all of them).

  Returns:
    (mesh, fsdp): the mesh, or None for one device, and whether to use FSDP on it; pass both to
    `horse_jax.runtime.load_model` and the mesh to the editors.

  Raises:
    UserError: a malformed `mesh`, more devices than exist, or an `fsdp` that is not a boolean/auto.
  """
  if mesh is None and jax.process_count() == 1:
    return None, False
  card = _card(model_path)
  made = hosts_mesh(devices) if mesh is None else mesh_for(mesh, card, devices)
  setting = (card.get("sharding") or {}).get("fsdp", "auto") if fsdp is None else fsdp
  return made, _want_fsdp(setting, model_path, made, card.get("dtype") or "float32")


def _card(model_path: str | None) -> dict[str, Any]:
  if not model_path or not os.path.isdir(model_path):
    return {}
  from horse_jax.models import read_config
  from horse_jax.models.cards import card_for
  try:
    return dict(card_for(model_path, read_config(model_path)) or {})
  except UserError:  # an unreadable folder is reported by the load; no card means the defaults
    return {}


def _want_fsdp(setting, model_path: str | None, mesh, dtype: str) -> bool:
  from horse_jax.models import sharding
  if str(setting).lower() != "auto":
    return sharding.want_fsdp(setting, {}, mesh, None)
  device_bytes = device_memory_bytes()
  if not device_bytes or not model_path or mesh.shape.get(sharding.DATA, 1) <= 1:
    return False
  from horse_jax.models import read_config
  from horse_jax.models.hf_map import abstract_params
  return sharding.want_fsdp("auto", abstract_params(read_config(model_path), dtype), mesh, device_bytes)


def hosts_mesh(devices=None):
  """The default mesh of a multi-host run: `model` over one host's devices, `data` over the hosts.

  Tensor parallelism exchanges activations in every layer, so it stays on a host's fast links;
  hosts only all-reduce over `data` (as MaxText lays out ICI and DCN axes). Row i of the mesh holds
  process i's devices.

  Args:
    devices: the devices (default all of them); every process must hold as many.

  Raises:
    UserError: processes with different device counts.
  """
  import numpy as np
  from horse_jax.models.sharding import DATA, MODEL
  devices = list(jax.devices() if devices is None else devices)
  by_process: dict[int, list] = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  counts = {len(v) for v in by_process.values()}
  if len(counts) != 1:
    raise UserError(f"multi-host: the processes hold different device counts ({sorted(counts)}); "
                    "give --mesh DATAxMODEL")
  grid = np.array([by_process[p] for p in sorted(by_process)], dtype=object)
  try:
    from jax.sharding import AxisType
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)
  except (ImportError, TypeError):  # older JAX: no axis types
    return jax.sharding.Mesh(grid, (DATA, MODEL))


def parse_mesh(text: str | None) -> tuple[int, int] | None:
  """"DATAxMODEL" -> (data, model); None or "auto" -> None (decided later from the card/devices).

  Raises:
    UserError: not of the form 2x4 with positive sizes.
  """
  if text is None or str(text).strip().lower() == "auto":
    return None
  match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
  if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
    raise UserError(f"--mesh {text!r}: expected DATAxMODEL with positive sizes, e.g. 2x4, or auto")
  return int(match.group(1)), int(match.group(2))


def card_mesh(card: dict[str, Any] | None, n_devices: int) -> tuple[int, int]:
  """The mesh `auto` picks: the card's `sharding.mesh` when it has one that fits the devices, else all
  devices on `model`."""
  if card and card.get("name") != "default":
    mesh = (card.get("sharding") or {}).get("mesh") or {}
    data, model = int(mesh.get("data", 1)), int(mesh.get("model", 1))
    if data >= 1 and model >= 1 and data * model <= n_devices and (data, model) != (1, 1):
      return data, model
  return 1, n_devices


def mesh_for(text: str | None, card: dict[str, Any] | None = None, devices=None):
  """A (data, model) mesh from `--mesh` ("2x4" or "auto"; see `card_mesh`)."""
  from horse_jax.models.sharding import make_mesh
  devices = list(jax.devices() if devices is None else devices)
  shape = parse_mesh(text) or card_mesh(card, len(devices))
  return make_mesh(shape[0], shape[1], devices)


def planning_mesh(text: str | None):
  """A mesh of `text` ("DATAxMODEL"; None: 1x1) to compile on without running (`horse_jax.plan`):
  devices of the default backend when it has enough, else that many CPU devices, forced when JAX's
  backends are not up yet (a CPU host then plans for a mesh it does not have).

  Raises:
    UserError: a malformed `text`, or too few devices once the backends are up.
  """
  from horse_jax.models.sharding import make_mesh
  data, model = parse_mesh(text) or (1, 1)
  n = data * model
  _force_cpu_devices(n)
  devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
  if len(devices) < n:
    raise UserError(f"--mesh needs {n} devices; {len(jax.devices())} available (JAX started before "
                    f"{n} CPU devices could be forced)")
  return make_mesh(data, model, devices[:n])


def _force_cpu_devices(n: int) -> None:
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return
  try:
    current = int(jax.config.jax_num_cpu_devices)
  except (AttributeError, TypeError, ValueError):
    current = -1
  if current < n:
    jax.config.update("jax_num_cpu_devices", n)


def device_memory_bytes() -> int | None:
  """Memory of one local device when the backend reports it (GPU/TPU), else None (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
    return None
  value = stats.get("bytes_limit")
  return int(value) if value else None
