"""Multi-host runs on JAX's own runtime (`jax.distributed`).

One program runs on every process (multi-controller): each process reads the same inputs, builds the
same global arrays from the slices its own devices hold, and runs the same jitted programs; only
process 0 writes results and prints logs. Nothing here starts processes: launch one per host (TPU pod:
`gcloud ... tpu-vm ssh --worker=all --command "horse-jax ... --distributed auto"`; GPU hosts: one
process per host with `--coordinator HOST:PORT --num-processes N --process-id I`, or SLURM's srun with
`--distributed auto`).

  initialize(coordinator, num_processes, process_id, auto)   before anything touches a JAX backend
  agree(fingerprint)                                         refuses unless all processes pass the same
  is_main() / main_print(...)                                process 0 only
  global_array(host_array, sharding)                         every process passes the same values
  to_host(array)                                             the full value on every process
  replicate(tree, mesh)                                      a copy on every device of the mesh
  broadcast_text(text) / gather_text(text) / barrier(name)   process 0's string / all of them / wait
  atomic_directory_all_processes(path)                       a folder every process writes into

The meshes themselves are `horse_jax.meshes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np

from horse_jax.errors import UserError

_STATE: dict[str, Any] = {"initialized": False}

# Seconds without a heartbeat after which the coordination service declares a process lost and every
# other process stops (JAX's default is 100 s; a lost process then held the others for minutes).
HEARTBEAT_TIMEOUT_S = 30
# Seconds a process waits for the others' `agree` fingerprints (they all start the command together).
AGREE_TIMEOUT_S = 120


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Joins a multi-process run (call before any JAX computation).

  Args:
    coordinator: "HOST:PORT" of process 0's coordination service.
    num_processes: number of processes in the run.
    process_id: this process's index (0 = the one that writes results).
    auto: let `jax.distributed.initialize()` detect everything (TPU pods, SLURM, Open MPI).

  Returns:
    True when this process joined a run, False when there is nothing to join (single process).

  Raises:
    UserError: a partial set of arguments, or the runtime refused to start.
  """
  explicit = (coordinator, num_processes, process_id)
  if not auto and all(v is None for v in explicit):
    return False
  if not auto and any(v is None for v in explicit):
    raise UserError("multi-host: give --coordinator, --num-processes and --process-id together "
                    "(or --distributed auto)")
  if _STATE["initialized"]:
    return True
  if num_processes is not None and (num_processes < 1 or not 0 <= (process_id or 0) < num_processes):
    raise UserError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
  # CPU processes need a collectives backend to talk to each other; GPUs/TPUs ignore this setting.
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass
  kwargs = {} if auto else dict(coordinator_address=coordinator, num_processes=int(num_processes),
                                process_id=int(process_id))
  kwargs["heartbeat_timeout_seconds"] = HEARTBEAT_TIMEOUT_S
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as err:
    raise UserError(f"multi-host: jax.distributed.initialize failed: {str(err).splitlines()[0]}") from None
  _STATE["initialized"] = True
  return True


def agree(fingerprint: Mapping[str, Any], timeout_s: float = AGREE_TIMEOUT_S) -> None:
  """Refuses unless every process of the run passed the same `fingerprint` (no-op in one process).

  Call right after `initialize`, before the backends start: a process that expects another process
  count or mesh would otherwise wait minutes for devices that never come, or run other programs than
  its peers and hang in a collective. The fingerprints go through the coordination service's
  key-value store: process 0 compares every other process's with its own, every other process
  compares process 0's, so each side of a mismatch refuses.

  Args:
    fingerprint: what must be equal on every process besides the process count (which is added),
      e.g. {"mesh": "2x4", "method": ..., "settings": ...} (JSON-serializable).
    timeout_s: how long to wait for the other processes' fingerprints.

  Raises:
    UserError: a process passed another fingerprint (naming the first differing key), or did not
      pass one within `timeout_s`.
  """
  if not _STATE["initialized"]:
    return
  from jax._src import distributed as jax_distributed  # the coordination service's client
  client = jax_distributed.global_state.client
  me, n = int(jax_distributed.global_state.process_id), int(jax_distributed.global_state.num_processes)
  mine = json.dumps({"num_processes": n, **fingerprint}, sort_keys=True, default=str)
  client.key_value_set(f"horse-jax/agree/{me}", mine)
  for other in (range(1, n) if me == 0 else [0]):
    try:
      theirs = client.blocking_key_value_get(f"horse-jax/agree/{other}", int(timeout_s * 1000))
    except Exception:  # noqa: BLE001  (the runtime raises its own error types for a timeout)
      raise UserError(f"multi-host: process {other} did not check in within {timeout_s:.0f} s "
                      f"(was it started with the same --num-processes {n} and --coordinator?)") from None
    if theirs != mine:
      raise UserError(f"multi-host: process {other} runs with other settings than process {me}: "
                      + _first_difference(json.loads(theirs), json.loads(mine)))


def fingerprint_digest(values: Any) -> str:
  """A short hash of a JSON-serializable value (e.g. the settings, or the files they come from)."""
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _first_difference(theirs: dict, mine: dict) -> str:
  """"KEY THEIRS there, MINE here" for the first differing key (nested dicts: the innermost key)."""
  for key in sorted(set(theirs) | set(mine)):
    a, b = theirs.get(key), mine.get(key)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        return _first_difference(a, b)
      return f"{key} {a!r} there, {b!r} here"
  return "fingerprints differ"


def is_main() -> bool:
  """True on process 0 (the one that writes files and prints)."""
  return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
  if is_main():
    print(*args, **kwargs)


def global_array(host_array: Any, sharding) -> jax.Array:
  """A global array from a value every process holds in full (each device takes its slice).

  In a single process this is `jax.device_put`; across processes every process must pass the same
  value (they all read the same inputs).
  """
  host_array = np.asarray(host_array)
  if jax.process_count() == 1:
    return jax.device_put(host_array, sharding)
  return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def to_host(x: Any) -> np.ndarray:
  """The full value of an array as NumPy on every process (gathers what other processes hold).

  The value is read from a fresh device copy: `np.asarray` on a JAX array caches the host copy on
  that array for as long as it lives, so reading a model's weights one by one for export would
  otherwise leave the whole model on the host (the copy here is freed once the result is).
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  import jax.numpy as jnp
  if x.is_fully_replicated:  # any local copy holds the value (no collective)
    return np.asarray(jnp.copy(x.addressable_data(0)))
  if x.is_fully_addressable:
    return np.asarray(jnp.copy(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree: Any) -> Any:
  return jax.tree_util.tree_map(to_host, tree)


def replicate(tree: Any, mesh) -> Any:
  """Every leaf of `tree` as a global array replicated over `mesh` (None: the tree unchanged).

  Leaves may live on one local device (e.g. a freshly initialized state): each process passes its
  own copy, which must hold the same value on every process (same seed, same inputs).
  """
  if mesh is None:
    return tree
  from jax.sharding import NamedSharding, PartitionSpec
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: global_array(to_host(x), replicated), tree)


def _text_bytes(text: str, max_bytes: int) -> np.ndarray:
  data = text.encode("utf-8")
  if len(data) > max_bytes:
    raise ValueError(f"multi-host text of {len(data)} bytes > {max_bytes}")
  padded = np.zeros(max_bytes + 1, np.uint8)  # the last byte stays 0: the end of every string
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  return padded


def _bytes_text(padded: np.ndarray) -> str:
  return bytes(padded[:int(np.argmin(padded))]).decode("utf-8")


def broadcast_text(text: str, max_bytes: int = 4096) -> str:
  """Process 0's `text` on every process (each process passes its own; only process 0's counts)."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  return _bytes_text(np.asarray(multihost_utils.broadcast_one_to_all(_text_bytes(text, max_bytes))))


def gather_text(text: str, max_bytes: int = 4096) -> list[str]:
  """Every process's `text`, in process order, on every process (so all can decide alike)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils
  rows = np.asarray(multihost_utils.process_allgather(_text_bytes(text, max_bytes)))
  return [_bytes_text(row) for row in rows.reshape(jax.process_count(), -1)]


@contextlib.contextmanager
def atomic_directory_all_processes(path: str):
  """`horse_jax.io.atomic_directory` when every process writes part of the folder (orbax saves).

  Process 0 creates the temp folder and tells the others its name; when every process has left the
  block it swaps the folder in whole. `path` must be the same folder on every process (a shared
  filesystem on several hosts).

  Yields:
    The temp folder (the same path on every process).
  """
  from horse_jax.io import atomic_directory
  if jax.process_count() == 1:
    with atomic_directory(path) as tmp:
      yield tmp
    return
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(atomic_directory(path)) if is_main() else ""
    tmp = broadcast_text(tmp)
    yield tmp
    barrier(f"written:{path}")  # every process has finished writing before process 0 swaps
  barrier(f"swapped:{path}")  # nobody reads `path` before it is in place


def barrier(name: str) -> None:
  """All processes wait here (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
