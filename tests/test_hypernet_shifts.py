"""Shifts of the edit program and of the stage-by-stage oracle against an independent NumPy float64
implementation of the HORSE/MALMEN/MEND formulas, and the program's cache against `jax.grad`.

The NumPy side re-derives everything from the cached keys/value grads: the running normalizer over
the mini-batches, the residual blocks (with random non-zero params, so the net is not the identity),
the value differences, the HORSE spread (both variants) and the ridge solve.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.data.tokenize import EditBatch, IGNORE
from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import packing, program
from horse_jax.editors.hypernet.packing import token_mask
from horse_jax.models import Hooks, Model, forward
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules, get_kernel

import hypernet_oracle as oracle

EPS = 2.0 ** -23


def make_batch(pairs, length=16):
  """Right-padded EditBatch from (prompt ids incl. BOS, target ids) pairs (labels shifted one left)."""
  b = len(pairs)
  ids = np.zeros((b, length), np.int32)
  mask = np.zeros((b, length), np.int32)
  labels = np.full((b, length), IGNORE, np.int32)
  plen = np.zeros((b,), np.int32)
  for i, (p, t) in enumerate(pairs):
    x = p + t[:-1]
    y = [IGNORE] * (len(p) - 1) + t
    ids[i, :len(x)] = x
    mask[i, :len(x)] = 1
    labels[i, :len(y)] = y
    plen[i] = len(p)
  return EditBatch(ids, mask, labels, plen)


def random_pairs(rng, n, vocab=128):
  out = []
  for _ in range(n):
    p = [1] + list(rng.integers(3, vocab, rng.integers(2, 7)))
    t = list(rng.integers(3, vocab, rng.integers(1, 4)))
    out.append((p, t))
  return out


def batches_of(pairs, size):
  return [make_batch(pairs[i:i + size]) for i in range(0, len(pairs), size)]


def randomize(state, seed):
  """Non-zero random hypernetwork params so that no block is the identity."""
  rng = np.random.default_rng(seed)
  nets = {}
  for skey, net in state.nets.items():
    blocks = []
    for blk in net["blocks"]:
      w, r = blk["A"].shape
      n_m = blk["scale"].shape[0]
      blocks.append({"A": jnp.asarray(rng.normal(size=(w, r)) / np.sqrt(w), jnp.float32),
                     "B": jnp.asarray(rng.normal(size=(r, w)) / np.sqrt(r), jnp.float32),
                     "bias": jnp.asarray(0.1 * rng.normal(size=(w,)), jnp.float32),
                     "scale": jnp.asarray(1 + 0.3 * rng.normal(size=(n_m, w)), jnp.float32),
                     "shift": jnp.asarray(0.1 * rng.normal(size=(n_m, w)), jnp.float32)})
    n_m = net["lr"].shape[0]
    nets[skey] = {"blocks": blocks,
                  "lr": jnp.asarray(1e-2 * (1 + rng.random(n_m)), jnp.float32),
                  "lamda": jnp.asarray(rng.normal(size=(n_m,)) - 1.0, jnp.float32)}
  return state._replace(nets=nets)


# ---------------------------------------------------------------- the independent NumPy version

def np_norm_update(st, x):
  n, mean, var = st
  m = x.shape[0]
  bm, bv = x.mean(0), x.var(0, ddof=1)
  tot = n + m
  delta = bm - mean
  return tot, mean + m * delta / tot, var + m * bv + n * m * delta ** 2 / tot


def np_normalize(st, x):
  n, mean, var = st
  return (x - mean) / (np.sqrt(var / (n - 1 + EPS)) + EPS)


def np_blocks(net, h, m):
  for blk in net["blocks"]:
    a, b = np.float64(blk["A"]), np.float64(blk["B"])
    x = np.maximum(h @ a @ b + np.float64(blk["bias"]), 0)
    x = np.float64(blk["scale"])[m] * x + np.float64(blk["shift"])[m]
    h = x + h
  return h


def np_shifts(state, cfg, rows_per_batch, keys, grads):
  """keys/grads: name -> float64 [R, .] of the real rows, in mini-batch order."""
  norms = {s: (0.0, 0.0, 0.0) for s in set(cfg.shape_keys)}
  start = 0
  for r in rows_per_batch:  # normalizer: per mini-batch, module by module in config order
    for name, skey in zip(cfg.modules, cfg.shape_keys):
      x = np.concatenate([keys[name][start:start + r], grads[name][start:start + r]], 1)
      norms[skey] = np_norm_update(norms[skey], x)
    start += r
  shifts, raw = {}, {}
  prev = None
  for l, (name, skey, m) in enumerate(zip(cfg.modules, cfg.shape_keys, cfg.module_index)):
    net = state.nets[skey]
    k, g = keys[name], grads[name]
    dk = k.shape[1]
    h = np_blocks(net, np_normalize(norms[skey], np.concatenate([k, g], 1)), m)
    kt, gt = h[:, :dk], h[:, dk:]
    lr = np.float64(net["lr"])[m]
    if cfg.method == "mend":
      shifts[name] = -lr * kt.T @ gt
      continue
    d = (-lr * (k * kt).sum(1))[:, None] * gt
    raw[name] = d
    if cfg.method == "horse" and l > 0:
      c = (d * raw[prev]).sum() / (raw[prev] * raw[prev]).sum()
      d = d - c * (grads[prev] if cfg.spread == "reference" else raw[prev])
    lam = np.float64(net["lamda"])[m]
    shifts[name] = np.linalg.solve(k.T @ k + np.exp(lam) * np.eye(dk), k.T @ d)
    prev = name
  return shifts


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny_llama_config(num_layers=3), seed=3)
  pairs = random_pairs(np.random.default_rng(0), 32)
  return model, batches_of(pairs, 8)


@pytest.mark.parametrize("method,spread,token", [("horse", "reference", "ans"),
                                                 ("horse", "gram_schmidt", "ans"),
                                                 ("malmen", "reference", "ans"),
                                                 ("mend", "reference", "all")])
def test_shifts_match_numpy(setup, method, spread, token):
  model, batches = setup
  mods = tuple(default_edit_modules(model.config, 3))
  cfg = hypernet.HypernetConfig(method=method, modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=24,
                                chunk=32, token=token, spread=spread, lm_batch=8)
  state = randomize(hypernet.init(cfg, jax.random.PRNGKey(1)), seed=7)
  shifts, _ = hypernet.edit(state, model, cfg, batches)  # the compiled edit program
  staged, _, cache, _, _ = oracle.predict(state, model, cfg, batches)
  rows = [int(token_mask(b, token).sum()) for b in batches]
  real = int(sum(rows))
  assert int(cache.valid.sum()) == real
  keys = {n: np.float64(cache.keys[n][:real]) for n in mods}
  grads = {n: np.float64(cache.grads[n][:real]) for n in mods}
  want = np_shifts(state, cfg, rows, keys, grads)
  for n in mods:
    for got in (np.float64(shifts[n]), np.float64(staged[n])):
      assert got.shape == get_kernel(model.params, n).shape
      rel = np.linalg.norm(got - want[n]) / np.linalg.norm(want[n])
      assert rel <= 1e-4, (n, rel)
  if method == "horse":  # the spread really changes the later modules' shifts
    import dataclasses
    plain = np_shifts(state, dataclasses.replace(cfg, method="malmen"), rows, keys, grads)
    np.testing.assert_allclose(plain[mods[0]], want[mods[0]])
    assert np.linalg.norm(plain[mods[1]] - want[mods[1]]) > 1e-3 * np.linalg.norm(want[mods[1]])


def test_fresh_net_is_identity_and_cache_is_gradient(setup):
  """The program's keys x value grads over all positions reproduce dLoss/dW; a fresh net returns
  normalized inputs."""
  model, batches = setup
  mods = tuple(default_edit_modules(model.config, 2))
  cfg = hypernet.HypernetConfig(method="malmen", modules=mods,
                                shapes=hypernet.module_shapes(model.params, mods), rank=16,
                                chunk=1024, token="all", lm_batch=8)
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  batch = batches[0]
  packed = packing.Packer(cfg.chunk)("edits", [batch], cfg.token, True)
  keys, vgrads = jax.jit(program.cached_keys_grads, static_argnames=("cfg", "mesh"))(
      model, program.put(packed), cfg=cfg)
  valid = np.asarray(packed.row_valid)[:, None]

  def loss(params):
    logits = forward(Model(params, model.config), batch.input_ids, batch.attention_mask).logits
    return oracle.token_ce(logits, batch.labels)

  g = jax.jit(jax.grad(loss))(model.params)
  for n in mods:
    want = np.float64(get_kernel(g, n))
    got = (np.float64(keys[n]) * valid).T @ (np.float64(vgrads[n]) * valid)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
  # Keys are the module inputs at the attended positions, row-major.
  cap = forward(model, batch.input_ids, batch.attention_mask, hooks=Hooks(capture=mods)).captured
  flat = np.asarray(cap[mods[0]]).reshape(-1, cfg.shapes[0][0])[np.asarray(batch.attention_mask).reshape(-1) == 1]
  np.testing.assert_allclose(np.asarray(keys[mods[0]][:len(flat)]), flat, rtol=1e-5, atol=1e-7)
  assert int(packed.row_valid.sum()) == len(flat)
  # A fresh network is the identity on normalized rows.
  from horse_jax.editors.hypernet.network import apply_blocks
  h = jax.random.normal(jax.random.PRNGKey(5), (4, sum(cfg.shapes[0])))
  np.testing.assert_array_equal(apply_blocks(state.nets[cfg.shape_keys[0]]["blocks"], h, 1), h)


def test_token_positions_ans_vs_all(setup):
  _, batches = setup
  b = batches[0]
  ans, all_ = token_mask(b, "ans"), token_mask(b, "all")
  for i in range(b.input_ids.shape[0]):
    n_tok = int(b.attention_mask[i].sum())
    n_tgt = int((b.labels[i] != IGNORE).sum())
    # answer positions: the last prompt token and the target tokens before the last one.
    want = np.zeros(b.input_ids.shape[1], bool)
    want[b.prompt_len[i] - 1:b.prompt_len[i] - 1 + n_tgt] = True
    np.testing.assert_array_equal(ans[i], want)
    np.testing.assert_array_equal(all_[i], np.arange(b.input_ids.shape[1]) < n_tok)
    assert ans[i].sum() < all_[i].sum()
