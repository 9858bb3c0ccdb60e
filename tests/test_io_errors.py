"""Bad input ends in one UserError line naming the thing; the CLI turns it into exit 2."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from horse_jax.cli.main import main
from horse_jax.errors import UserError
from horse_jax.models import Hooks, forward, from_pretrained, load_tokenizer, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config


@pytest.fixture()
def checkpoint(tmp_path):
  """A tiny llama checkpoint written by save_pretrained (no torch needed)."""
  folder = tmp_path / "ckpt"
  save_pretrained(random_model(tiny_llama_config(num_layers=2, vocab_size=64)), folder)
  return folder


def _rewrite_tensors(folder, change):
  tensors = load_file(str(folder / "model.safetensors"))
  change(tensors)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _one_line(err):
  text = str(err.value)
  assert "\n" not in text
  return text


def test_missing_folder(tmp_path):
  with pytest.raises(UserError) as err:
    from_pretrained(tmp_path / "nope")
  assert "nope" in _one_line(err) and "does not exist" in _one_line(err)


def test_missing_config(checkpoint):
  os.remove(checkpoint / "config.json")
  with pytest.raises(UserError, match="config.json is missing"):
    from_pretrained(checkpoint)


def test_invalid_config_json(checkpoint):
  (checkpoint / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json: not valid JSON"):
    from_pretrained(checkpoint)


def _set_config_field(checkpoint, key, value):
  hf = json.loads((checkpoint / "config.json").read_text())
  hf[key] = value
  (checkpoint / "config.json").write_text(json.dumps(hf))


def test_unsupported_model_type(checkpoint):
  _set_config_field(checkpoint, "model_type", "bert")
  with pytest.raises(UserError, match="unsupported model_type 'bert'"):
    from_pretrained(checkpoint)


def test_missing_weights(checkpoint):
  os.remove(checkpoint / "model.safetensors")
  with pytest.raises(UserError, match="neither model.safetensors nor"):
    from_pretrained(checkpoint)


def test_missing_tensor(checkpoint):
  _rewrite_tensors(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(UserError) as err:
    from_pretrained(checkpoint)
  assert "'model.layers.1.mlp.up_proj.weight' is missing" in _one_line(err)
  assert "model.safetensors" in _one_line(err)


def test_wrong_shape(checkpoint):
  def change(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
  _rewrite_tensors(checkpoint, change)
  with pytest.raises(UserError) as err:
    from_pretrained(checkpoint)
  text = _one_line(err)
  assert "model.layers.0.self_attn.k_proj.weight" in text and "[5, 64]" in text
  assert "[32, 64]" in text and "model.safetensors" in text


def test_shard_listed_in_index_but_missing(checkpoint):
  tensors = load_file(str(checkpoint / "model.safetensors"))
  os.remove(checkpoint / "model.safetensors")
  save_file(tensors, str(checkpoint / "a.safetensors"), metadata={"format": "pt"})
  weight_map = {k: "a.safetensors" for k in tensors}
  weight_map["model.norm.weight"] = "b.safetensors"
  (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(UserError, match="b.safetensors: shard file listed in"):
    from_pretrained(checkpoint)


def test_unknown_module_name_in_hooks(checkpoint):
  model = from_pretrained(checkpoint)
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(UserError, match="unknown module name 'model.layers.7.mlp.down_proj'"):
    forward(model, ids, hooks=Hooks(capture=("model.layers.7.mlp.down_proj",)))
  with pytest.raises(UserError, match="unknown module name 'model.layers.0.mlp.fc_out'"):
    forward(model, ids, hooks=Hooks(offsets={"model.layers.0.mlp.fc_out": jnp.zeros((1, 4, 64))}))


def test_missing_tokenizer(checkpoint, tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")
  with pytest.raises(UserError):
    save_pretrained(from_pretrained(checkpoint), tmp_path / "out", tokenizer_src=tmp_path / "nope")


def test_cli_info_and_convert(checkpoint, tmp_path, capsys):
  assert main(["info", str(checkpoint), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["model_type"] == "llama" and info["layers"] == 2 and info["card"] == "default"
  assert main(["convert", str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  assert from_pretrained(tmp_path / "bf16", dtype="bfloat16").dtype == jnp.bfloat16
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_error_is_one_line_and_exit_2_in_process(checkpoint, capsys):
  shutil.rmtree(checkpoint)
  assert main(["convert", str(checkpoint), str(checkpoint) + "-out"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("horse-jax: error:") and "ckpt" in err


def test_cli_error_subprocess_has_no_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "horse_jax.cli.main", "info", str(tmp_path / "nope")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "nope" in lines[0]


def test_unsupported_activation(checkpoint):
  _set_config_field(checkpoint, "hidden_act", "swish_of_doom")
  with pytest.raises(UserError, match="unsupported activation 'swish_of_doom'"):
    from_pretrained(checkpoint)


def test_per_layer_sliding_window_is_rejected():
  from horse_jax.models.config import config_from_hf
  base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=8,
              num_hidden_layers=4, num_attention_heads=2, sliding_window=8, use_sliding_window=True)
  assert config_from_hf(dict(base, max_window_layers=0)).sliding_window == 8
  assert config_from_hf(dict(base, max_window_layers=4)).sliding_window is None
  with pytest.raises(UserError, match="sliding window on some layers only"):
    config_from_hf(dict(base, max_window_layers=2))
