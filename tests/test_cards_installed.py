"""Model cards are package data: a regular (non-editable) install finds them without the source tree.

`pip install .` of a copy of the project (built as a wheel, then installed) goes into a fresh venv
(dependencies come from the test interpreter's site-packages through a .pth line, so nothing is
downloaded); then
`horse-jax info` on a checkpoint folder named like a card, run outside the repository, must report
that card, read from the installed `horse_jax/cards/`.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_finds_the_cards(tmp_path):
  from horse_jax.models import save_pretrained
  from horse_jax.models.init import random_model, tiny_llama_config

  src = tmp_path / "src"  # build from a copy: the working tree stays free of build outputs
  src.mkdir()
  for name in ("pyproject.toml", "setup.py", "README.md"):
    shutil.copy(ROOT / name, src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(ROOT / "horse_jax", src / "horse_jax", ignore=ignore)
  shutil.copytree(ROOT / "models", src / "models", ignore=ignore)
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
  # What `pip install .` does, in two steps: build the wheel (with this interpreter's setuptools, no
  # download), then install it, not editable, into the fresh venv.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  str(src), "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path)
  wheel = next((tmp_path / "dist").glob("horse_jax-*.whl"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                  str(wheel)], check=True, env=env, cwd=tmp_path)
  site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  # Dependencies only: a .pth line adds the directory, not the editable-install hook inside it.
  Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

  model = random_model(tiny_llama_config(num_layers=32, hidden_size=16, intermediate_size=32), seed=0)
  save_pretrained(model, str(tmp_path / "llama-3-8b"))
  clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  clean["JAX_PLATFORMS"] = "cpu"
  where = subprocess.run([str(py), "-c", "import horse_jax.models.cards as c; print(c.cards_dir())"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, env=clean).stdout.strip()
  assert Path(where).resolve().is_relative_to(Path(site).resolve()), where
  assert Path(where, "llama-3-8b.yaml").is_file()
  assert Path(where, "llama-3-8b", "config.json").is_file()  # horse-jax plan reads shipped configs
  out = subprocess.run([str(venv / "bin" / "horse-jax"), "info", str(tmp_path / "llama-3-8b"), "--json"],
                       check=True, capture_output=True, text=True, cwd=tmp_path, env=clean).stdout
  info = json.loads(out[out.index("{"):])
  assert info["card"] == "llama-3-8b"
  assert info["editor.layer"] == "model.layers.29.mlp.down_proj"
  assert info["editor.hopfield_key_match_threshold"] == 0.7  # models/llama-3-8b.yaml
