"""A trained hypernetwork edits with the LM mini-batch size it was trained with unless told otherwise.

Value gradients are token means over an LM mini-batch, so their scale (which the hypernetwork and its
normalizer learned) depends on the mini-batch size; the token chunk is only compute layout.
"""

import json
import os

import pytest

from horse_jax.cli.edit_hypernet import explicit_lm_batch

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "world")


def test_explicit_lm_batch_only_when_given(tmp_path):
  assert explicit_lm_batch(None, []) is None
  assert explicit_lm_batch(None, ["editor.lr=0.1"]) is None
  cfg = tmp_path / "c.yaml"
  cfg.write_text("data:\n  batch_size: 12\neditor:\n  rank: 4\n")
  assert explicit_lm_batch(str(cfg), []) == 12
  assert explicit_lm_batch(str(cfg), ["data.batch_size=5"]) == 5  # --set wins over the file
  other = tmp_path / "d.yaml"
  other.write_text("editor:\n  rank: 4\n")
  assert explicit_lm_batch(str(other), []) is None


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "hypernet")), reason="no shipped hypernet")
def test_sweep_editor_keeps_the_trained_lm_batch():
  from horse_jax.editors import hypernet
  from horse_jax.eval import methods
  from horse_jax.models import from_pretrained
  with open(os.path.join(ROOT, "hypernet", "hypernet.json")) as f:
    trained = json.load(f)["config"]["lm_batch"]
  model_dir = os.path.join(ROOT, "model")
  ctx = methods.CellContext(model=from_pretrained(model_dir), tokenizer=None, score=None,
                            logits_fn=None, generate_fn=None, model_path=model_dir)
  folder = os.path.join(ROOT, "hypernet")
  cfg, _ = methods._hypernet_editor(hypernet, "horse", ctx, {"hypernet": folder}, 0)
  assert cfg.lm_batch == trained
  cfg, _ = methods._hypernet_editor(
      hypernet, "horse", ctx, {"hypernet": folder, "settings": {"data": {"batch_size": trained + 3},
                                                                "editor": {"batch_size": 512}}}, 0)
  assert cfg.lm_batch == trained + 3 and cfg.chunk == 512
