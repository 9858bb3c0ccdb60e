"""Checkpoint export: bit-exact round trips, sharded indexes, tokenizer copy, transformers reload."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

from horse_jax.models import (apply, from_pretrained, load_tokenizer, save_pretrained)  # noqa: E402
from horse_jax.models.init import random_model, tiny_llama_config  # noqa: E402


def _assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_files_equal(folder_a, folder_b):
  a = load_file(str(folder_a / "model.safetensors"))
  b = load_file(str(folder_b / "model.safetensors"))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "qwen2", "qwen3"])
def test_load_save_load_is_bit_exact(arch, tiny_hf, tmp_path):
  _, folder = tiny_hf(arch)
  model = from_pretrained(folder)
  save_pretrained(model, tmp_path / "out")
  _assert_files_equal(folder, tmp_path / "out")  # same names, dtypes and bytes as transformers wrote
  again = from_pretrained(tmp_path / "out")
  _assert_trees_equal(model.params, again.params)
  assert again.config == model.config


def test_bfloat16_checkpoint_round_trips_through_float32(tiny_hf, tmp_path):
  """Loaded as float32 (for editing) and exported in the file's own bfloat16: same bytes."""
  _, folder = tiny_hf("llama", torch_dtype=torch.bfloat16)
  model = from_pretrained(folder, dtype=jnp.float32)
  save_pretrained(model, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  _assert_files_equal(folder, tmp_path / "out")
  save_pretrained(model, tmp_path / "f32", dtype=jnp.float32)
  assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
  _assert_trees_equal(model.params, from_pretrained(tmp_path / "f32").params)


def test_sharded_index_written_by_hand_loads_the_same(tiny_hf, tmp_path):
  _, folder = tiny_hf("llama")
  tensors = load_file(str(folder / "model.safetensors"))
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  out = tmp_path / "sharded"
  out.mkdir()
  weight_map = {}
  for filename, keys in halves.items():
    save_file({k: tensors[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    weight_map.update({k: filename for k in keys})
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (out / "config.json").write_text((folder / "config.json").read_text())
  _assert_trees_equal(from_pretrained(folder).params, from_pretrained(out).params)


def test_export_shards_above_the_limit(tiny_hf, tmp_path):
  _, folder = tiny_hf("gpt2")
  model = from_pretrained(folder)
  save_pretrained(model, tmp_path / "out", max_shard_size=20_000)
  files = sorted(os.listdir(tmp_path / "out"))
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  _assert_trees_equal(model.params, from_pretrained(tmp_path / "out").params)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "qwen3"])
def test_transformers_loads_our_export(arch, tiny_hf, tmp_path):
  import transformers
  torch_model, folder = tiny_hf(arch)
  model = from_pretrained(folder)
  # An "edit": perturb one kernel so the export is not just a copy of the input files.
  name = {"llama": ("model", "layers", "1", "mlp", "down_proj"),
          "qwen3": ("model", "layers", "1", "self_attn", "q_norm"),
          "gpt2": ("transformer", "h", "1", "mlp", "c_proj"),
          "gptj": ("transformer", "h", "1", "mlp", "fc_out")}[arch]
  node = model.params
  for key in name:
    node = node[key]
  leaf = "scale" if "scale" in node else "kernel"
  node[leaf] = node[leaf] + 0.05
  save_pretrained(model, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.RandomState(0).randint(3, 101, (2, 6))
  with torch.no_grad():
    ref = reloaded(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(apply(model, jnp.asarray(ids)))
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_random_model_without_hf_config_exports_for_transformers(model_type, tmp_path):
  import transformers
  cfg = tiny_llama_config(num_layers=2, vocab_size=64, model_type=model_type)
  model = random_model(cfg, seed=3)
  save_pretrained(model, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.RandomState(0).randint(0, 64, (2, 5))
  with torch.no_grad():
    ref = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_array_less(np.abs(np.asarray(apply(model, jnp.asarray(ids))) - ref).max(), 1e-4)
  assert from_pretrained(tmp_path / "out").config == cfg


def _word_tokenizer(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
  fast.save_pretrained(str(folder))


def test_tokenizer_is_copied_and_loads(tiny_hf, tmp_path):
  _, folder = tiny_hf("llama")
  tok_dir = tmp_path / "tok"
  _word_tokenizer(tok_dir)
  save_pretrained(from_pretrained(folder), tmp_path / "out", tokenizer_src=tok_dir)
  tok = load_tokenizer(tmp_path / "out")
  assert tok("the cat sat")["input_ids"] == [4, 5, 6]
  assert tok.pad_token == "</s>"  # none was set: eos stands in


def test_failed_export_leaves_the_old_folder_intact(tiny_hf, tmp_path, monkeypatch):
  _, folder = tiny_hf("llama")
  model = from_pretrained(folder)
  save_pretrained(model, tmp_path / "out")
  before = (tmp_path / "out" / "model.safetensors").read_bytes()
  from horse_jax.models import hf_io

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(hf_io, "stream_safetensors", boom)
  with pytest.raises(RuntimeError):
    save_pretrained(model, tmp_path / "out")
  assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folders left behind


def test_gpt2_legacy_names_and_buffers(tiny_hf, tmp_path):
  """Old GPT-2 files: no `transformer.` prefix, causal-mask buffers stored; both handled."""
  _, folder = tiny_hf("gpt2")
  tensors = load_file(str(folder / "model.safetensors"))
  legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  legacy["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
  out = tmp_path / "legacy"
  out.mkdir()
  save_file(legacy, str(out / "model.safetensors"))
  (out / "config.json").write_text((folder / "config.json").read_text())
  _assert_trees_equal(from_pretrained(folder).params, from_pretrained(out).params)
