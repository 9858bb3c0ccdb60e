"""The architecture registry: one registration adds an architecture everywhere."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.errors import UserError
from horse_jax.models import (Architecture, apply, config_from_hf, default_codebook_module,
                              default_edit_modules, module_names, register_architecture,
                              supported_model_types)
from horse_jax.models import config_to_hf, hf_map, registry, sharding
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
