"""train/capacity_probe.py: the widened model computes the same function; fine-tuned shifts edit."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "checkpoints", "world")


def _probe():
  spec = importlib.util.spec_from_file_location("capacity_probe", os.path.join(ROOT, "train", "capacity_probe.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_widen_keeps_every_logit_and_adds_live_neurons():
  from horse_jax.models import apply
  from horse_jax.models.init import random_model, tiny_llama_config
  model = random_model(tiny_llama_config(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2))
  wide = _probe().widen_mlp(model, extra=80)
  assert wide.config.intermediate_size == 128
  ids = np.random.default_rng(0).integers(0, 50, (3, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  np.testing.assert_allclose(np.asarray(apply(wide, ids, mask)), np.asarray(apply(model, ids, mask)),
                             rtol=1e-5, atol=1e-5)
  mlp = wide.params["model"]["layers"]["1"]["mlp"]
  assert mlp["down_proj"]["kernel"].shape == (128, 32)
  assert float(jnp.abs(mlp["down_proj"]["kernel"][48:]).max()) == 0.0
  # The new neurons compute something: their gate/up columns are not copies of old ones or zero.
  gate = np.asarray(mlp["gate_proj"]["kernel"])
  assert np.abs(gate[:, 48:]).min(axis=0).max() > 0
  assert np.linalg.matrix_rank(gate) == 32


@pytest.mark.skipif(not os.path.isdir(os.path.join(WORLD, "model")), reason="no shipped world model")
def test_finetuned_shifts_install_the_edits():
  from horse_jax.runtime import load_model, logits_fn
  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.eval.scoring import score_records
  model, tok = load_model(os.path.join(WORLD, "model"))
  records = load_records(os.path.join(WORLD, "data", "zsre_test.json"), limit=8)
  shifts = _probe().finetune_shifts(model, tok, records, ["model.layers.3.mlp.down_proj"], steps=30,
                                    lr=3e-2, loc_coef=1.0, lm_batch=8, log=lambda s: None)
  s = score_records(records, tok, logits_fn(hypernet.apply(model, shifts)), logits_fn(model),
                    max_length=64, progress=False)["summary"]
  assert s["pre_edit_exact"] == 0.0 and s["edit_exact"] >= 0.75
  assert s["loc_acc"] >= 0.75
