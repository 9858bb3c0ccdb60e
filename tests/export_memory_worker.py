"""One process of `test_export_memory`'s multi-host export: loads a checkpoint sharded over a
(data, model) mesh that spans every process, builds a codebook on the same mesh, exports both with
tracemalloc running (`export.save_edit`: deltas + checkpoint; `export.save_codebook`) and prints
{"model_peak", "codebook_peak"} (bytes) as one JSON line.

  python tests/export_memory_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID MODEL OUT MAX_SHARD_SIZE
"""

import json
import sys
import tracemalloc

from horse_jax import distributed


MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"]  # deltas: zeros


def codebook_arrays(rows: int = 1000, d_in: int = 512, d_out: int = 512):
  """The live rows of a test codebook (a fixed seed: every process builds the same one)."""
  import numpy as np
  rng = np.random.default_rng(7)
  return {"keys": rng.normal(size=(rows, d_in)).astype(np.float32),
          "values": rng.normal(size=(rows, d_out)).astype(np.float32),
          "labels": rng.integers(-100, 1000, size=(rows, 2)).astype(np.int32),
          "radius": rng.random(rows).astype(np.float32),
          "count": np.asarray([rows], np.int64), "n_edits": np.asarray([rows - 1], np.int64)}


def peak_bytes(fn) -> int:
  """Peak bytes tracemalloc saw allocated (and not yet freed) while `fn()` ran."""
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def main(argv: list[str]) -> None:
  coordinator, n, pid, model_path, out, max_shard_size = argv
  distributed.initialize(coordinator, int(n), int(pid))
  import os

  from horse_jax import export
  from horse_jax.editors.codebook import state
  from horse_jax.editors.codebook.settings import CodebookSettings
  from horse_jax.models import from_pretrained
  from horse_jax.models.sharding import make_mesh
  mesh = make_mesh(int(n), None)  # data across processes, model within each
  model = from_pretrained(model_path, mesh=mesh, fsdp=True)
  book = state.place(state.from_arrays(codebook_arrays(), capacity=2048), mesh)
  settings = CodebookSettings(layer="model.layers.1.mlp.down_proj")
  peaks = {
      # Only process 0 needs a folder (as the CLI passes it).
      "model_peak": peak_bytes(lambda: export.save_edit(
          out if int(pid) == 0 else None, model, model, MODULES, max_shard_size=int(max_shard_size))),
      "codebook_peak": peak_bytes(lambda: export.save_codebook(
          os.path.join(out, "codebook"), book, settings)),
  }
  print(json.dumps(peaks), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
