"""Multi-host on JAX's own runtime: two local processes x 4 CPU devices (gloo) on one 2x4 mesh.

Every process runs the same `horse-jax edit` (HORSE, HoReN); only process 0 writes (process 1 is given another
--out to prove it writes nothing) and the result equals the single-process one.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from horse_jax.cli.main import main
from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config
from test_cli_train_edit import tiny_tokenizer, zsre_rows

EDIT = {
    "horse": ["--method", "horse", "--set", "data.batch_size=4", "--set", "editor.rank=16",
              "--set", "editor.lr=1e-2",
              "--set", "model.edit_modules=[model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj]"],
    "horen": ["--method", "horen"],
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["horse", "horen"])
def test_two_processes_write_one_folder_equal_to_one_process(tmp_path, method):
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=vocab, num_layers=3), seed=1),
                  str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  (tmp_path / "edits.json").write_text(json.dumps(zsre_rows(np.random.default_rng(1), 8)))
  common = ["edit", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "edits.json"), *EDIT[method]]
  assert main([*common, "--out", str(tmp_path / "single")]) == 0

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  procs = []
  for i in range(2):
    out = tmp_path / ("multi" if i == 0 else "multi_process1")
    cmd = [sys.executable, "-m", "horse_jax.cli.main", *common, "--out", str(out), "--mesh", "2x4",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert f"{method}: 8 edits" in logs[0] and f"{method}: 8 edits" not in logs[1]  # process 0 logs

  assert not (tmp_path / "multi_process1").exists()  # process 1 wrote nothing
  assert sorted(os.listdir(tmp_path / "multi")) == sorted(os.listdir(tmp_path / "single"))
  from safetensors.numpy import load_file
  ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "multi"))
  assert ma["summary"] == mb["summary"] and ma["records"] == mb["records"]
  if method == "horen":
    a, b = (load_file(str(tmp_path / d / "codebook" / "codebook.safetensors")) for d in ("single", "multi"))
    assert sorted(a) == sorted(b) and int(a["count"][0]) > 1
    for name in a:
      np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5)
    return
  a, b = (load_file(str(tmp_path / d / "deltas.safetensors")) for d in ("single", "multi"))
  assert sorted(a) == sorted(b)
  for name in a:
    assert np.abs(a[name]).max() > 0
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-4 * np.abs(a[name]).max())
  wa, wb = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("single", "multi"))
  for name in wa:
    np.testing.assert_allclose(wb[name], wa[name], rtol=1e-5, atol=1e-6)
