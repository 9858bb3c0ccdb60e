"""Export with bounded host memory: a checkpoint (and a codebook) sharded over a mesh, on one
process with 8 forced CPU devices and on two processes x 4 devices, is written one tensor at a time.

The peak is what `tracemalloc` sees allocated while exporting: NumPy buffers are counted (the
gathered tensors and their converted copies), XLA's own device buffers are not. The bound is the
issue's: one file shard (`max_shard_size`) plus the largest tensor, plus `SLACK` for Python objects;
a whole-model gather would exceed it (the model is several times larger). Reloads are bit-exact.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from export_memory_worker import MODULES, codebook_arrays, peak_bytes
from horse_jax import export
from horse_jax.editors.codebook import persist, state
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.models import from_pretrained, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.sharding import make_mesh

# ~20 MB of float32 weights; the largest tensor (the embedding) is 2 MB.
CFG = dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
           num_kv_heads=2, head_dim=64)
MAX_SHARD = 3_000_000
SLACK = 1 << 20  # Python objects beside the tensors (JSON headers, JAX's per-call bookkeeping)
CAPACITY = 2048  # codebook rows as placed (the live rows are `codebook_arrays`' 1000)


def read_folder(folder) -> dict[str, np.ndarray]:
  """Every tensor of the safetensors files in `folder`."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(folder, name), framework="np") as f:
        out.update({key: f.get_tensor(key) for key in f.keys()})
  return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp("export_memory") / "llama"
  save_pretrained(random_model(tiny_llama_config(**CFG), seed=5), folder)
  return folder


def assert_sharded_export(folder, source: dict[str, np.ndarray]) -> None:
  """`folder` holds `source` bit-exact, in files of at most MAX_SHARD bytes and a transformers index."""
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and sorted(index["weight_map"]) == sorted(source)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in source.values())
  for name in files:  # whole tensors per file, at most the limit unless a tensor alone is larger
    with safe_open(str(folder / name), framework="np") as f:
      sizes = [f.get_slice(k).get_shape() for k in f.keys()]
      assert f.metadata() == {"format": "pt"}
    assert len(sizes) == 1 or sum(4 * int(np.prod(s)) for s in sizes) <= MAX_SHARD
  got = read_folder(folder)
  for name, value in source.items():
    assert got[name].dtype == value.dtype
    np.testing.assert_array_equal(got[name], value)


def test_export_from_a_mesh_holds_one_tensor_at_a_time(checkpoint, tmp_path):
  model = from_pretrained(checkpoint, mesh=make_mesh(2, 4), fsdp=True)
  source = read_folder(checkpoint)
  total = sum(v.nbytes for v in source.values())
  largest = max(v.nbytes for v in source.values())
  peak = peak_bytes(lambda: save_pretrained(model, tmp_path / "out", max_shard_size=MAX_SHARD))
  print(f"model export peak {peak / 2**20:.2f} MiB; model {total / 2**20:.2f} MiB, largest tensor "
        f"{largest / 2**20:.2f} MiB, max_shard_size {MAX_SHARD / 2**20:.2f} MiB")
  assert peak >= largest // 2  # the tensors are counted: the bound below is not vacuous
  assert peak <= MAX_SHARD + largest + SLACK < total
  assert_sharded_export(tmp_path / "out", source)
  reloaded = from_pretrained(tmp_path / "out")  # our loader, bit-exact
  for path in ("model.layers.3.mlp.down_proj.kernel", "model.embed_tokens.embedding"):
    from horse_jax.models import hf_map
    np.testing.assert_array_equal(np.asarray(hf_map.get_path(reloaded.params, path)),
                                  np.asarray(hf_map.get_path(model.params, path)))


def test_transformers_loads_the_sharded_export_bit_exact(checkpoint, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  model = from_pretrained(checkpoint, mesh=make_mesh(1, 8))
  save_pretrained(model, tmp_path / "out", max_shard_size=MAX_SHARD)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  weights = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  for name, value in read_folder(checkpoint).items():
    np.testing.assert_array_equal(weights[name], value)


def test_codebook_save_from_a_mesh_holds_one_array_at_a_time(tmp_path):
  arrays = codebook_arrays()
  book = state.place(state.from_arrays(arrays, capacity=CAPACITY), make_mesh(2, 4))
  at_capacity = [np.asarray(getattr(book, name)).nbytes for name in state.ROW_ARRAYS]
  settings = CodebookSettings(layer="model.layers.1.mlp.down_proj")
  peak = peak_bytes(lambda: export.save_codebook(str(tmp_path / "cb"), book, settings))
  print(f"codebook save peak {peak / 2**20:.2f} MiB; codebook {sum(at_capacity) / 2**20:.2f} MiB "
        f"at capacity, largest array {max(at_capacity) / 2**20:.2f} MiB")
  assert max(at_capacity) // 2 <= peak <= max(at_capacity) + SLACK < sum(at_capacity)
  saved = read_folder(tmp_path / "cb")
  assert sorted(saved) == sorted(arrays)
  for name, value in arrays.items():
    np.testing.assert_array_equal(saved[name], value)
  loaded, _ = persist.load(tmp_path / "cb")
  np.testing.assert_array_equal(np.asarray(loaded.keys)[:1000], arrays["keys"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_export_one_tensor_at_a_time(checkpoint, tmp_path):
  """2 processes x 4 CPU devices, one 2x4 mesh whose `data` axis spans the processes (FSDP splits
  every matrix, and the codebook's rows, over both): each process holds at most one file shard
  plus the largest tensor; process 0 writes, bit-exact."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(here, "export_memory_worker.py"), f"127.0.0.1:{port}", "2",
       str(i), str(checkpoint), str(tmp_path / f"out{i}"), str(MAX_SHARD)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  peaks = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  print("two-process peaks (bytes):", peaks)
  source = read_folder(checkpoint)
  largest = max(v.nbytes for v in source.values())
  book_largest = CAPACITY * codebook_arrays()["keys"].shape[1] * 4
  for p in peaks:
    assert p["model_peak"] <= MAX_SHARD + largest + SLACK < sum(v.nbytes for v in source.values())
    assert p["codebook_peak"] <= book_largest + SLACK
  assert not (tmp_path / "out1").exists()  # process 1 wrote nothing
  assert_sharded_export(tmp_path / "out0" / "model", source)
  deltas = read_folder(tmp_path / "out0")  # save_edit's deltas.safetensors (edited = original)
  assert sorted(deltas) == sorted(f"{m}.weight" for m in MODULES)
  for name, value in deltas.items():
    np.testing.assert_array_equal(value, np.zeros_like(source[name], np.float32))
  saved = read_folder(tmp_path / "out0" / "codebook")
  for name, value in codebook_arrays().items():
    np.testing.assert_array_equal(saved[name], value)
