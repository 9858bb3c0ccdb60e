"""HORSE / MALMEN / MEND on (data, model) meshes of the 8 forced CPU devices equal one device.

Checks the declared shardings (packed and cached rows split over `data`, shifts split by column over
`model`) and that a meta-training run compiles its step once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import program
from horse_jax.models import make_mesh, shard_model
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules

from test_hypernet_shifts import batches_of, random_pairs, randomize


def rel(a, b):
  a, b = np.float64(a), np.float64(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny_llama_config(num_layers=3), seed=5)
  rng = np.random.default_rng(2)
  sets = [batches_of(random_pairs(rng, 24), 8) for _ in range(3)]
  return model, sets


def make(model, method):
  mods = tuple(default_edit_modules(model.config, 2))
  cfg = hypernet.HypernetConfig(method=method, modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=12,
                                chunk=16, token="all" if method == "mend" else "ans", lm_batch=8,
                                lr=1e-2, meta_lr=1e-3)
  return cfg, randomize(hypernet.init(cfg, jax.random.PRNGKey(3)), seed=4)


def split(x, mesh_shape):
  """(row split, column split): how many pieces each device's shard is of the whole."""
  shard = x.sharding.shard_shape(x.shape)
  return tuple(full // part for full, part in zip(x.shape, shard))


MESHES = [("horse", (2, 4)), ("horse", (1, 8)), ("malmen", (2, 4)), ("malmen", (1, 8)),
          ("mend", (2, 4)), ("mend", (1, 8))]


def slow_except(first):
  return [c if c == first else pytest.param(*c, marks=pytest.mark.slow) for c in MESHES]


@pytest.mark.parametrize("method,mesh_shape", slow_except(("horse", (2, 4))))
def test_mesh_edit_equals_single_device(setup, method, mesh_shape):
  model, (edits, _, _) = setup
  cfg, state = make(model, method)
  mesh = make_mesh(*mesh_shape)
  sharded = shard_model(model, mesh)

  # Same shifts; shifts split by column over `model`.
  want, _ = hypernet.edit(state, model, cfg, edits)
  got, _ = hypernet.edit(state, sharded, cfg, edits, mesh=mesh)
  for n in cfg.modules:
    assert rel(got[n], want[n]) <= 1e-4, (n, rel(got[n], want[n]))
    assert split(got[n], mesh_shape) == (1, mesh_shape[1]), got[n].sharding  # columns over model

  # Packed rows split over `data`; cached rows over `data` x `model` (the program's cache stage on
  # its own; 8 divides the padded cached rows).
  packed = hypernet.Packer(cfg.chunk, row_multiple=8)("edits", edits, cfg.token, True)
  dev = program.put(packed, mesh)
  assert split(dev.input_ids, mesh_shape)[0] == mesh_shape[0] == split(dev.rows, mesh_shape)[0]
  cache, _ = jax.jit(program.cache_rows, static_argnames=("cfg", "mesh"))(
      sharded, state.norms, dev, cfg=cfg, mesh=mesh)
  assert packed.rows.shape[0] % 8 == 0
  assert len(cache.keys) == len(cache.grads) == 1  # both modules share one hypernetwork: one run
  for x in cache.keys + cache.grads:  # [modules, rows, width]: rows split
    assert x.shape[0] == len(cfg.modules) and split(x, mesh_shape) == (1, 8, 1), x.sharding


@pytest.mark.slow
@pytest.mark.parametrize("method,mesh_shape", MESHES)
def test_mesh_train_steps_equal_single_device(setup, method, mesh_shape):
  """Three meta-training steps: same metrics and hypernetworks; the step compiles once per mesh."""
  model, (edits, rephrase, loc) = setup
  cfg, state = make(model, method)
  mesh = make_mesh(*mesh_shape)
  sharded = shard_model(model, mesh)
  copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)  # the program donates its state
  one, many = copy(state), copy(state)
  p1, p2 = hypernet.Packer(cfg.chunk), hypernet.Packer(cfg.chunk, row_multiple=8)
  before = program.train_program._cache_size()
  for step in range(3):
    one, m1 = hypernet.train_step(one, model, cfg, edits, rephrase, loc, packer=p1)
    many, m2 = hypernet.train_step(many, sharded, cfg, edits, rephrase, loc, mesh=mesh, packer=p2)
    if step == 0:
      after_first = program.train_program._cache_size()
    for k in m1:
      np.testing.assert_allclose(m2[k], m1[k], rtol=1e-3, err_msg=k)  # after Adam steps
  assert after_first - before <= 2  # at most one compile per (mesh, shapes) ...
  assert program.train_program._cache_size() == after_first  # ... and none after the first step
  for a, b in zip(jax.tree_util.tree_leaves(many.nets), jax.tree_util.tree_leaves(one.nets)):
    # Adam divides by sqrt(v): entries whose gradients are tiny move by rounding-sized differences.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=2e-3 * np.abs(np.asarray(b)).max() + 1e-9)
  assert all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(many.nets))
  assert int(many.step) == 3
