"""The shipped embedded default (checkpoints/world): loads everywhere, knows its world, data is sane."""

import json
import os
import random

import numpy as np
import pytest

from horse_jax.world import generator

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                    "world")
MODEL = os.path.join(ROOT, "model")
pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason="checkpoints/world not built")


@pytest.fixture(scope="module")
def report():
  with open(os.path.join(ROOT, "world.json")) as f:
    return json.load(f)


def test_shipped_data_is_the_seeded_world(report):
  world = generator.build_world(report["seed"], generator.WorldSpec(**report["world"]))
  for split in ("train", "val", "test"):
    with open(os.path.join(ROOT, "data", f"zsre_{split}.json")) as f:
      zsre = json.load(f)
    with open(os.path.join(ROOT, "data", f"counterfact_{split}.json")) as f:
      cf = json.load(f)
    assert zsre == [generator.to_zsre(e) for e in world.edits[split]]
    assert cf == [generator.to_counterfact(e, i) for i, e in enumerate(world.edits[split])]
  assert len(world.edits["test"]) >= 1000


def test_transformers_and_horse_jax_agree():
  torch = pytest.importorskip("torch")
  from transformers import LlamaForCausalLM

  from horse_jax.models import apply, from_pretrained, load_tokenizer
  tok = load_tokenizer(MODEL)
  ours = from_pretrained(MODEL)
  theirs = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
  prompts = ["Where was Bola born?", "What is the favourite colour of Zarnu?"]
  for p in prompts:
    ids = tok(p)["input_ids"]
    a = np.asarray(apply(ours, np.asarray([ids], np.int32)))
    with torch.no_grad():
      b = theirs(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_model_knows_a_sample_of_training_questions(report):
  from horse_jax.models import from_pretrained, load_tokenizer
  from horse_jax.world import pretrain
  world = generator.build_world(report["seed"], generator.WorldSpec(**report["world"]))
  pairs = random.Random(1).sample(generator.pretraining_pairs(world), 256)
  acc = pretrain.answer_accuracy(from_pretrained(MODEL), load_tokenizer(MODEL), pairs,
                                 batch_size=256)
  assert acc["full_answer_acc"] >= 0.9
