"""Meta-training steps whose cache comes from the memo of the training records equal the steps that
compute it (`program.train_program`), which test_hypernet_program.py checks against the
stage-by-stage reference path."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.data.loaders import load_records
from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import memo as memo_lib
from horse_jax.editors.hypernet.data import MemoTokenizer, step_batches, step_indices
from horse_jax.models import load_tokenizer
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules
from horse_jax.world.build import default_world_dir

N_RECORDS, N_EDITS = 40, 12


@pytest.fixture(scope="module")
def setup():
  root = default_world_dir()
  base = load_tokenizer(os.path.join(root, "model"))
  tok = MemoTokenizer(base)
  records = load_records(os.path.join(root, "data", "zsre_train.json"))[:N_RECORDS]
  model = random_model(tiny_llama_config(num_layers=3, vocab_size=len(base)), seed=5)
  return model, tok, records


def make_cfg(model, method):
  mods = tuple(default_edit_modules(model.config, 2))
  return hypernet.HypernetConfig(method=method, modules=mods,
                                 shapes=hypernet.module_shapes(model.params, mods), rank=8,
                                 chunk=16, token="all" if method == "mend" else "ans", lm_batch=5,
                                 meta_lr=1e-3, lr=1e-2)


@pytest.mark.parametrize("method", ["horse", pytest.param("mend", marks=pytest.mark.slow)])
def test_memo_steps_equal_computed_steps(setup, method):
  model, tok, records = setup
  cfg = make_cfg(model, method)
  # Several fill calls (the last one short) and mini-batches of 5 with different label counts, so
  # each row's weight (1 / label tokens of its mini-batch) differs from its fill-time grouping.
  memo = memo_lib.build(model, tok, records, cfg, per_call=16)
  want_rows = sum(int(np.sum(np.asarray(b.labels) != -100)) if cfg.token == "ans"
                  else int(np.asarray(b.attention_mask).sum())
                  for b in hypernet.edit_batches(tok, records, cfg.lm_batch))
  assert memo.n_slots == want_rows
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  computed, memoized = state, jax.tree_util.tree_map(jnp.copy, state)
  p1, p2 = hypernet.Packer(cfg.chunk), hypernet.Packer(cfg.chunk)
  for step in range(3):
    idx = step_indices(7, step, len(records), N_EDITS)
    recs = [records[i] for i in idx]
    sets = step_batches(tok, recs, cfg)
    computed, m1 = hypernet.train_step_async(computed, model, cfg, *sets, packer=p1)
    rows = memo_lib.step_rows(memo, tok, idx, recs, cfg)
    memoized, m2 = hypernet.train_step_async(memoized, model, cfg, *sets, packer=p2,
                                             memo_rows=rows, memo=memo)
    m1, m2 = hypernet.check_metrics(m1), hypernet.check_metrics(m2)
    for k in m1:
      np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=f"step {step} {k}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(memoized.nets),
                          jax.tree_util.tree_leaves(computed.nets)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-3 * np.abs(np.asarray(b)).max() + 1e-9, err_msg=str(path))
  for a, b in zip(jax.tree_util.tree_leaves(memoized.norms), jax.tree_util.tree_leaves(computed.norms)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_memo_refuses_other_records(setup):
  """A step's records are checked against the memo's per-record row counts: a record whose target
  changed since the memo was built is refused, not read from the wrong rows."""
  model, tok, records = setup
  cfg = make_cfg(model, "horse")
  memo = memo_lib.build(model, tok, records[:10], cfg)
  recs = list(records[:10])
  recs[3] = dataclasses.replace(recs[3], target=recs[3].target + " " + recs[3].target)
  with pytest.raises(ValueError, match="memo rows do not match"):
    memo_lib.step_rows(memo, tok, np.arange(10), recs, cfg)
