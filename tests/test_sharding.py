"""Tensor-parallel sharding on the 8 forced CPU devices (2 x 4 mesh): placements and results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.models import apply, from_pretrained, make_mesh, shard_model
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.sharding import batch_sharding, spec_for


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8
  return make_mesh(data=2, model=4)


def _shard_shape(array):
  return array.addressable_shards[0].data.shape


def test_mesh_axes(mesh):
  assert dict(mesh.shape) == {"data": 2, "model": 4}


def test_llama_leaves_are_placed_by_the_rules(mesh):
  model = random_model(tiny_llama_config(num_layers=2, vocab_size=128), seed=0)
  sharded = shard_model(model, mesh).params
  layer = sharded["model"]["layers"]["1"]
  expect = {  # leaf: (spec, per-device shard shape)
      "q": (layer["self_attn"]["q_proj"]["kernel"], P(None, "model"), (64, 16)),
      "k": (layer["self_attn"]["k_proj"]["kernel"], P(None, "model"), (64, 8)),
      "o": (layer["self_attn"]["o_proj"]["kernel"], P("model"), (16, 64)),
      "up": (layer["mlp"]["up_proj"]["kernel"], P(None, "model"), (64, 32)),
      "down": (layer["mlp"]["down_proj"]["kernel"], P("model"), (32, 64)),
      "embed": (sharded["model"]["embed_tokens"]["embedding"], P("model"), (32, 64)),
      "lm_head": (sharded["lm_head"]["kernel"], P(None, "model"), (64, 32)),
      "norm": (layer["input_layernorm"]["scale"], P(), (64,)),
  }
  for key, (leaf, spec, shape) in expect.items():
    assert isinstance(leaf.sharding, NamedSharding), key
    assert leaf.sharding.mesh == mesh, key
    assert leaf.sharding.spec == spec, key
    assert _shard_shape(leaf) == shape, key
    assert len(leaf.addressable_shards) == 8, key


def test_indivisible_dims_fall_back_to_replicated(mesh):
  assert spec_for("model.embed_tokens.embedding", (101, 32), mesh) == P()
  assert spec_for("model.layers.0.self_attn.k_proj.kernel", (32, 6), mesh) == P()
  assert spec_for("model.layers.0.self_attn.q_proj.kernel", (32, 8), mesh) == P(None, "model")
  assert spec_for("transformer.h.0.attn.c_attn.bias", (96,), mesh) == P("model")
  assert spec_for("transformer.h.0.mlp.c_proj.kernel", (128, 32), mesh) == P("model")
  assert spec_for("transformer.ln_f.bias", (32,), mesh) == P()


def test_each_architecture_uses_its_own_rules(mesh):
  from horse_jax.models.sharding import rules_for
  llama_rules = rules_for(tiny_llama_config())
  gpt2_rules = rules_for(tiny_llama_config(model_type="gpt2"))
  # A GPT-2 row projection is not a llama module: llama's table leaves it replicated.
  assert spec_for("transformer.h.0.mlp.c_proj.kernel", (128, 32), mesh, rules=llama_rules) == P()
  assert spec_for("transformer.h.0.mlp.c_proj.kernel", (128, 32), mesh,
                  rules=gpt2_rules) == P("model")
  assert spec_for("model.layers.0.mlp.down_proj.kernel", (128, 32), mesh,
                  rules=llama_rules) == P("model")


def test_sharded_jitted_forward_equals_unsharded(mesh):
  model = random_model(tiny_llama_config(num_layers=2, vocab_size=128), seed=0)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 128, (4, 8))
  mask = np.ones((4, 8), np.int32)
  mask[0, :3] = 0
  expected = np.asarray(apply(model, jnp.asarray(ids), jnp.asarray(mask)))
  sharded = shard_model(model, mesh)
  ids_s = jax.device_put(jnp.asarray(ids), batch_sharding(mesh))
  mask_s = jax.device_put(jnp.asarray(mask), batch_sharding(mesh))
  logits = jax.jit(apply)(sharded, ids_s, mask_s)
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_from_pretrained_with_mesh_reads_sharded_arrays(arch, mesh, tiny_hf, monkeypatch):
  pytest.importorskip("torch")
  from horse_jax.models import hf_io
  _, folder = tiny_hf(arch)
  plain = from_pretrained(folder)
  reads = []
  original = hf_io._read

  def recording_read(slice_, entry, index, dtype):
    block = original(slice_, entry, index, dtype)
    reads.append((entry.path, block.shape, entry.shape))
    return block

  monkeypatch.setattr(hf_io, "_read", recording_read)
  sharded = from_pretrained(folder, mesh=mesh)
  # Column-sharded kernels are read a quarter at a time, never whole.
  kernel_reads = [r for r in reads if r[0].endswith(("gate_proj.kernel", "c_attn.kernel"))]
  assert kernel_reads and all(got[1] * 4 == full[1] for _, got, full in kernel_reads)
  if arch == "llama":
    leaf = sharded.params["model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]  # [32, 64]
    assert leaf.sharding.spec == P(None, "model") and _shard_shape(leaf) == (32, 16)
    leaf = sharded.params["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]  # [32, 32]
    assert leaf.sharding.spec == P("model") and _shard_shape(leaf) == (8, 32)
  elif arch == "qwen3":
    attn = sharded.params["model"]["layers"]["0"]["self_attn"]
    leaf = attn["o_proj"]["kernel"]  # [4 heads x 16, 32]
    assert leaf.sharding.spec == P("model") and _shard_shape(leaf) == (16, 32)
    assert attn["q_norm"]["scale"].sharding.spec == P()  # per-head norm: replicated
  else:
    leaf = sharded.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]  # [32, 96]
    assert leaf.sharding.spec == P(None, "model") and _shard_shape(leaf) == (32, 24)
  for a, b in zip(jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(sharded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = jnp.asarray(np.random.RandomState(1).randint(3, 101, (2, 6)))
  np.testing.assert_allclose(np.asarray(jax.jit(apply)(sharded, ids)),
                             np.asarray(apply(plain, ids)), atol=1e-5)
