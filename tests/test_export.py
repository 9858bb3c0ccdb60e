"""horse_jax.export and horse_jax.runtime as a JAX user calls them: an edit's deltas in Hugging Face
names and layout, the edited checkpoint, and loading it back."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from horse_jax import export, runtime
from horse_jax.errors import UserError
from horse_jax.models import Model, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config
from test_cli_train_edit import tiny_tokenizer


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
  """(folder of the original, original, edited, {module: the added delta in our layout [in, out]})."""
  root = tmp_path_factory.mktemp("export")
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(root / "tok"))
  original = random_model(tiny_llama_config(vocab_size=vocab, num_layers=2), seed=3)
  save_pretrained(original, str(root / "llama"), tokenizer_src=str(root / "tok"))
  rng = np.random.default_rng(0)
  params = {**original.params, "model": {**original.params["model"],
                                         "layers": dict(original.params["model"]["layers"])}}
  added = {}
  for layer, proj in (("0", "down_proj"), ("1", "up_proj")):
    old = np.asarray(params["model"]["layers"][layer]["mlp"][proj]["kernel"])
    added[f"model.layers.{layer}.mlp.{proj}"] = delta = rng.normal(size=old.shape).astype(np.float32)
    mlp = {**params["model"]["layers"][layer]["mlp"], proj: {"kernel": old + delta}}
    params["model"]["layers"][layer] = {**params["model"]["layers"][layer], "mlp": mlp}
  return root, original, Model(params, original.config), added


def test_hf_deltas_are_the_torch_layout_differences(edit):
  _, original, edited, added = edit
  deltas = export.hf_deltas(original, edited, list(added))
  assert sorted(deltas) == sorted(f"{m}.weight" for m in added)
  for module, delta in added.items():  # torch Linear.weight is [out, in]: our kernel transposed
    got = deltas[f"{module}.weight"]
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(got, delta.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="no Hugging Face weight"):
    export.hf_deltas(original, edited, ["model.layers.0.mlp.nowhere"])


def test_save_edit_writes_deltas_and_a_checkpoint_that_loads_back(edit, tmp_path):
  root, original, edited, added = edit
  export.save_edit(str(tmp_path / "out"), original, edited, list(added), tokenizer_src=str(root / "llama"))
  on_disk = load_file(str(tmp_path / "out" / export.DELTAS_FILE))
  for module, delta in added.items():
    np.testing.assert_allclose(on_disk[f"{module}.weight"], delta.T, rtol=1e-5, atol=1e-5)
  model, tokenizer = runtime.load_model(str(tmp_path / "out" / export.MODEL_FOLDER))
  assert tokenizer("alpha").input_ids  # the tokenizer files were copied along
  mine = model.params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]
  base = original.params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_allclose(np.asarray(mine), np.asarray(base) + added["model.layers.1.mlp.up_proj"],
                             rtol=1e-6, atol=1e-6)
  untouched = (m.params["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"] for m in (model, original))
  np.testing.assert_array_equal(*map(np.asarray, untouched))


def test_load_model_dtype_and_logits(edit):
  root, original, _, _ = edit
  half, _ = runtime.load_model(str(root / "llama"), dtype="bfloat16")
  assert half.params["model"]["norm"]["scale"].dtype.name == "bfloat16"
  ids = np.array([[1, 5, 6, 7]], np.int32)

  class Batch:  # what scoring passes: an EditBatch's ids and mask
    input_ids, attention_mask = ids, np.ones_like(ids)

  from horse_jax.models import apply
  full, _ = runtime.load_model(str(root / "llama"))
  np.testing.assert_allclose(np.asarray(runtime.logits_fn(full)(Batch)),
                             np.asarray(apply(original, ids, np.ones_like(ids))), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError):
    runtime.load_model(str(root / "missing"))
