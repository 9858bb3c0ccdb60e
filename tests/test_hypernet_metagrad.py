"""HORSE meta-gradients do not depend on the mesh or on where the cache comes from.

The first step's meta-gradient (`program.meta_grads_program`) on one device, on a 2x4 mesh of the 8
forced CPU devices (row-split gram, blocked Cholesky and refined solves in `shifts.py`), and with
the cache gathered from the memo of the training records instead of recomputed, agree within 1e-4
relative (Frobenius, per parameter array); it is the gradient the training step clips and feeds to
Adam. The slow test trains three steps each way on the embedded world (train/world.yaml recipe) and
compares the validation ES / GS / LS to 3 decimals.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.data.loaders import load_records
from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import memo as memo_lib
from horse_jax.editors.hypernet import program
from horse_jax.editors.hypernet.data import MemoTokenizer, step_batches, step_indices
from horse_jax.models import load_tokenizer, make_mesh, shard_model
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules
from horse_jax.world.build import default_world_dir

from test_hypernet_shifts import randomize

N_RECORDS, N_EDITS = 40, 16


def max_rel(a, b):
  """Largest ||a - b|| / ||b|| over the parameter arrays (float64; arrays of b that are 0 skipped)."""
  out = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.float64(x), np.float64(y)
    if np.linalg.norm(y) > 0:
      out = max(out, np.linalg.norm(x - y) / np.linalg.norm(y))
  return out


@pytest.fixture(scope="module")
def setup():
  base = load_tokenizer(os.path.join(default_world_dir(), "model"))
  tok = MemoTokenizer(base)
  records = load_records(os.path.join(default_world_dir(), "data", "zsre_train.json"))[:N_RECORDS]
  model = random_model(tiny_llama_config(num_layers=3, vocab_size=len(base)), seed=5)
  mods = tuple(default_edit_modules(model.config, 2))
  cfg = hypernet.HypernetConfig(method="horse", modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=8, chunk=16,
                                token="ans", lm_batch=5, meta_lr=1e-3, lr=1e-2)
  return model, tok, records, cfg


def first_grads(model, tok, records, cfg, state, mesh, use_memo):
  """Step 0's meta-gradient (seed 7's records) on `mesh`, cache recomputed or from the memo."""
  lm = model if mesh is None else shard_model(model, mesh)
  packer = hypernet.Packer(cfg.chunk, 8)
  idx = step_indices(7, 0, len(records), N_EDITS)
  recs = [records[i] for i in idx]
  edits, rephrase, loc = (program.put(packer(kind, b, cfg.token, kind == "edits"), mesh)
                          for kind, b in zip(("edits", "rephrase", "loc"),
                                             step_batches(tok, recs, cfg)))
  if mesh is not None:
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if not use_memo:
    return program.meta_grads_program(state, lm, edits, rephrase, loc, cfg, mesh)[0]
  memo = memo_lib.build(lm, tok, records, cfg, mesh=mesh, per_call=16)
  rows = program.put(memo_lib.step_rows(memo, tok, idx, recs, cfg), mesh)
  return program.meta_grads_program(state, lm, None, rephrase, loc, cfg, mesh, memo=memo.arrays,
                                    rows=rows)[0]


@pytest.mark.slow  # compiles the meta-gradient program four times (1x1 / 2x4, memo / recompute)
def test_first_step_grads_agree_across_meshes_and_memo(setup):
  model, tok, records, cfg = setup
  state = randomize(hypernet.init(cfg, jax.random.PRNGKey(3)), seed=4)
  mesh = make_mesh(2, 4)
  want = jax.device_get(first_grads(model, tok, records, cfg, state, None, False))
  assert max(np.abs(x).max() for x in jax.tree_util.tree_leaves(want)) > 0
  for name, m, use_memo in (("1x1 memo", None, True), ("2x4", mesh, False),
                            ("2x4 memo", mesh, True)):
    got = jax.device_get(first_grads(model, tok, records, cfg, state, m, use_memo))
    assert max_rel(got, want) <= 1e-4, (name, max_rel(got, want))

  # It is the gradient the training step applies: Adam's first moment after one step is
  # (1 - b1) x the clipped gradient.
  one = jax.tree_util.tree_map(jnp.copy, state)
  idx = step_indices(7, 0, len(records), N_EDITS)
  one, _ = hypernet.train_step(one, model, cfg, *step_batches(tok, [records[i] for i in idx], cfg))
  norm = np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in jax.tree_util.tree_leaves(want)))
  clipped = jax.tree_util.tree_map(lambda g: g * min(1.0, cfg.max_grad_norm / norm), want)
  mu = jax.tree_util.tree_map(lambda m: m / 0.1, one.opt_state[1].inner_state[0].mu)
  assert max_rel(mu, clipped) <= 1e-5


@pytest.mark.slow
def test_three_world_steps_score_the_same_on_meshes_and_memo():
  """Three meta-training steps of the world recipe, 1x1 / 2x4 x recomputed / memo cache: the
  validation ES / GS / LS agree to 3 decimals."""
  from benchmarks.metagrad import RECIPE, metagrad_agreement
  r = metagrad_agreement(config=os.path.join(os.path.dirname(RECIPE), "world.yaml"), steps=3,
                         valid_n=64)
  assert max(r["grads_vs_1x1"].values()) <= 1e-4, r["grads_vs_1x1"]
  want = r["valid"]["1x1"]
  for name, got in r["valid"].items():
    for k in ("edit_acc", "rephrase_acc", "loc_acc"):
      assert abs(got[k] - want[k]) < 1e-3, (name, k, got, want)
