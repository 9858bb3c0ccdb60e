"""A trained hypernetwork edits with the LM mini-batch size it was trained with unless told otherwise.

Value gradients are token means over an LM mini-batch, so their scale (which the hypernetwork and its
normalizer learned) depends on the mini-batch size; the token chunk is only compute layout.
"""

import json
import os

import pytest

from horse_jax import settings

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "world")


def _explicit(config, overrides):
  """data.batch_size when the user chose it (--config or --set), else None: the rule
  `protocol.make_editor` applies to a trained hypernetwork."""
  r = settings.resolve("horse", configs=[config] if config else [], overrides=overrides)
  return r["data.batch_size"] if r.given("data.batch_size") else None


def test_explicit_lm_batch_only_when_given(tmp_path):
  assert _explicit(None, []) is None
  assert _explicit(None, ["editor.lr=0.1"]) is None
  cfg = tmp_path / "c.yaml"
  cfg.write_text("data:\n  batch_size: 12\neditor:\n  rank: 4\n")
  assert _explicit(str(cfg), []) == 12
  assert _explicit(str(cfg), ["data.batch_size=5"]) == 5  # --set wins over the file
  other = tmp_path / "d.yaml"
  other.write_text("editor:\n  rank: 4\n")
  assert _explicit(str(other), []) is None


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
