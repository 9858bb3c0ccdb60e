"""A bound on how far the host dispatches ahead of the devices.

  for batch in batches:
    outputs.append(step(batch))        # asynchronous: returns before the devices finish
    inflight.settle(outputs)           # waits for the step DEPTH back, so at most DEPTH run ahead
  results = jax.device_get(outputs)    # the one transfer, as before

Why a loop that dispatches many sharded programs must do this (a deadlock, not a slowdown):
XLA's CPU client runs every partition of a multi-device program as a task on one thread pool of
max(cores, devices) threads: 8 on a 2-core host with 8 forced devices, exactly one thread per
partition. Those tasks block at each collective until all partitions of the program arrive. The
same pool also runs the launches of the programs queued behind, and a launch blocks on a
per-device semaphore once 32 programs wait on that device (`max_inflight_computations_per_device`).
A loop that never waits fills that queue (1,000 edits scored in batches of 64: over 100 programs
per device); a launch then blocks on one pool thread while the program at the head of the queue
holds the other seven in a collective and waits for the eighth partition, which has no thread left.
The process then stops at "Expected 8 threads to join the rendezvous" and XLA aborts it after 40 s.
Keeping at most DEPTH steps of a few programs each in flight keeps every device's queue far below
32, so a launch never blocks a pool thread. Accelerators lose nothing: DEPTH steps queued keep
them busy, and results stay on the device until the caller fetches them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

# Steps allowed to run ahead. A step is a handful of programs (a generation batch scored against the
# pre-edit model runs seven: two generations, two slices, three accuracies); XLA's CPU client blocks
# a launch once 32 programs wait on one device, and (DEPTH + 1) * 7 = 21 stays below that.
DEPTH = 2


def settle(pending: Sequence[Any], depth: int = DEPTH) -> None:
  """Waits until every step of `pending` but the last `depth` has finished computing.

  Call after appending each step's outputs; it waits for one step (the one `depth` back) and
  transfers nothing. Programs on a device run in dispatch order, so the older steps are done too.

  Args:
    pending: the outputs of the steps dispatched so far, oldest first (any pytrees; non-JAX leaves
      such as None or NumPy arrays are ignored).
    depth: steps allowed to run ahead of the host.
  """
  if len(pending) > depth:
    leaves = [x for x in jax.tree_util.tree_leaves(pending[-depth - 1]) if isinstance(x, jax.Array)]
    jax.block_until_ready(leaves)
