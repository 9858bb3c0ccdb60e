"""The architecture registry: one registration adds an architecture everywhere."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.errors import UserError
from horse_jax.models import (Architecture, apply, config_from_hf, default_codebook_module,
                              default_edit_modules, module_names, register_architecture,
                              supported_model_types)
from horse_jax.models import Hooks, config_to_hf, hf_map, registry, sharding, transformer
from horse_jax.models.hooks import Tap
from horse_jax.models.names import get_kernel
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.transformer import Model


def test_builtin_model_types_are_registered():
  assert {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj"} <= set(supported_model_types())


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2", "gptj"])
def test_every_addressable_module_has_a_kernel_in_the_table_and_a_sharding_rule(model_type):
  arch = registry.get(model_type)
  cfg = tiny_llama_config(model_type=model_type, num_kv_heads=4, rotary_dim=8)
  paths = {e.path for e in hf_map.entries(cfg)}
  for name in module_names(cfg):
    assert f"{name}.kernel" in paths, name
  # Every per-layer linear kernel is split over `model` by some rule of its own architecture.
  for suffix in arch.linear_modules:
    path = f"{arch.layer_prefix}.0.{suffix}.kernel"
    assert any(re.search(p, path) for p, _ in arch.sharding_rules), path
  assert default_edit_modules(cfg, 1) == [f"{arch.layer_prefix}.3.{arch.edit_module}"]
  assert default_codebook_module(cfg, 2) == f"{arch.layer_prefix}.2.{arch.codebook_module}"


def test_a_new_architecture_is_one_registration():
  """A copy of the llama architecture under a new model_type loads, runs and shards like llama."""
  llama = registry.get("llama")
  try:
    register_architecture(llama._replace(name="my_llama", model_types=("my_llama",),
                                         hf_classes={"my_llama": "LlamaForCausalLM"}))
    assert isinstance(registry.get("my_llama"), Architecture)
    base = random_model(tiny_llama_config(num_layers=1, vocab_size=32), seed=1)
    hf = dict(config_to_hf(base.config), model_type="my_llama")
    cfg = config_from_hf(hf)
    assert cfg.model_type == "my_llama"
    mine = Model(base.params, cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 32, (2, 5)))
    np.testing.assert_array_equal(np.asarray(apply(mine, ids)), np.asarray(apply(base, ids)))
    assert module_names(cfg) == module_names(base.config)
    assert sharding.rules_for(cfg) == llama.sharding_rules
  finally:
    registry._REGISTRY.pop("my_llama", None)


def test_unknown_model_type_names_the_supported_ones():
  with pytest.raises(UserError, match="unsupported model_type 'mamba'.*qwen3"):
    config_from_hf({"model_type": "mamba", "vocab_size": 10})


def _tiny_config(model_type):
  """A 3-layer config of `model_type` small enough for a CPU test."""
  cfg = tiny_llama_config(model_type=model_type, num_layers=3, num_kv_heads=4, rotary_dim=8,
                          vocab_size=64)
  if model_type != "gpt_oss":
    return cfg
  from horse_jax.models.gpt_oss import FULL, SLIDING, GptOssConfig
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  return GptOssConfig(**fields, num_experts=4, experts_per_token=2, window=3,
                      layer_types=(SLIDING, FULL, SLIDING))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj",
                                        "gpt_oss"])
def test_residual_writers_are_the_modules_whose_output_is_added_after_the_layer(model_type):
  """A module is a residual writer iff adding d to its output at layer 1 gives the same logits as
  adding d to the residual stream leaving layer 1: found here from the forward pass for every
  addressable module, and compared with what the architecture declares."""
  arch = registry.get(model_type)
  model = random_model(_tiny_config(model_type), seed=3)
  prefix = arch.layer_prefix
  # Sharper weights: a module whose change later parts of its layer see shows it clearly.
  model = Model(jax.tree_util.tree_map(lambda x: x * 4.0, model.params), model.config)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 6)))
  delta = jnp.asarray(np.random.RandomState(1).normal(size=(2, 6, model.config.hidden_size)),
                      jnp.float32)
  after = transformer.run_layers(model, transformer.hidden_before(model, 1, ids),
                                 jnp.ones_like(ids), transformer.default_positions(jnp.ones_like(ids)),
                                 Tap(None), 1, 2)
  added_after = np.asarray(transformer.forward_from(model, 2, after + delta).logits)
  found = set()
  for suffix in arch.linear_modules:
    name = f"{prefix}.1.{suffix}"
    if get_kernel(model.params, name).shape[-1] != model.config.hidden_size:
      continue  # its output is not residual-shaped
    hooked = np.asarray(apply(model, ids, hooks=Hooks(offsets={name: delta})))
    assert np.abs(hooked - apply(model, ids)).max() > 1e-3, name  # the offset reached the logits
    if np.allclose(hooked, added_after, rtol=0, atol=1e-4):
      found.add(suffix)
  assert found == set(arch.residual_writers)
