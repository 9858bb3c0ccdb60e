"""World pre-training pieces: answer positions, the answer-only loss, resumable training."""

import dataclasses

import jax
import numpy as np
import pytest

from horse_jax.data.tokenize import IGNORE
from horse_jax.models import apply
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.world import pretrain


def test_answer_positions():
  labels = np.full((3, 8), IGNORE, np.int32)
  labels[0, 3:5] = [7, 9]
  labels[1, 5:8] = [4, 4, 2]
  labels[2, 1] = 5
  pos, ok = pretrain.answer_positions(labels, width=4)
  assert pos.tolist() == [[3, 4, 0, 0], [5, 6, 7, 0], [1, 0, 0, 0]]
  assert ok.tolist() == [[True, True, False, False], [True, True, True, False],
                         [True, False, False, False]]
  with pytest.raises(ValueError):
    pretrain.answer_positions(labels, width=2)


def test_answer_loss_matches_full_forward_cross_entropy():
  model = random_model(tiny_llama_config(vocab_size=50), seed=1)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 50, (2, 8)).astype(np.int32)
  mask = np.ones((2, 8), np.int32)
  mask[1, 6:] = 0
  labels = np.full((2, 8), IGNORE, np.int32)
  labels[0, 4:7] = rng.integers(3, 50, 3)
  labels[1, 3:5] = rng.integers(3, 50, 2)
  pos, ok = pretrain.answer_positions(labels)
  ans = np.where(ok, np.take_along_axis(labels, pos, axis=1), 0).astype(np.int32)
  got = float(pretrain.answer_loss(model, ids, mask, pos, ans, ok))
  # Independent float64 cross-entropy from the full logits.
  logits = np.asarray(apply(model, ids, mask), np.float64)
  nll = []
  for b, t in zip(*np.nonzero(labels != IGNORE)):
    row = logits[b, t]
    nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[b, t]])
  np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)


class _Tok:
  """Minimal tokenizer: one id per character, BOS = 1, pad = 0."""

  bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

  def __call__(self, text, add_special_tokens=True):
    ids = [3 + (ord(c) % 40) for c in text]
    return {"input_ids": ([1] if add_special_tokens else []) + ids}

  def __len__(self):
    return 48


@pytest.mark.slow
def test_pretrain_learns_and_resumes(tmp_path):
  tok = _Tok()
  pairs = [("ab?", "x"), ("cd?", "y"), ("ef?", "z"), ("gh?", "x")]
  cfg = pretrain.PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, seq_len=8, batch_size=4, steps=6, peak_lr=1e-2,
                                warmup_steps=1, ckpt_every=3)
  straight = pretrain.pretrain(tok, pairs, cfg, ckpt_dir=str(tmp_path / "a"), log=lambda s: None)
  # Resuming from the step-3 checkpoint replays steps 3..5 with the same data order.
  lines = []
  resumed = pretrain.pretrain(tok, pairs, cfg, ckpt_dir=str(tmp_path / "a"), log=lines.append)
  assert any("resumed pre-training from step 3" in line for line in lines)
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  longer = pretrain.pretrain(tok, pairs, dataclasses.replace(cfg, steps=60), log=lambda s: None)
  acc = pretrain.answer_accuracy(longer, tok, pairs, batch_size=4)
  assert acc["full_answer_acc"] == 1.0 and acc["greedy_exact"] == 1.0
