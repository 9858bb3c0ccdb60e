"""Blocks of HoReN/GRACE edits equal one-at-a-time edits (with and without two edits of a block on
one codebook row), the fast training forward equals the full edited forward, and editing on 2x4 and
1x8 meshes equals one device with declared codebook shardings and no recompilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from horse_jax.data.tokenize import IGNORE
from horse_jax.editors.codebook import edit, infer, state
from horse_jax.editors.codebook import settings as settings_lib
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.models import make_mesh, shard_model
from horse_jax.models.init import random_model, tiny_llama_config

from test_codebook_edit import make_batch


@pytest.fixture(scope="module")
def model():
  return random_model(tiny_llama_config(num_layers=2), seed=1)


def edits_with_collisions(n=12, seed=3):
  """n distinct random edits, then repeats that land on rows trained earlier in the same block:
  the same edit again (HoReN reuses its row) and a known prompt with a new target."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(3, 128, rng.integers(4, 10))) for _ in range(n)]
  targets = [list(rng.integers(3, 128, rng.integers(1, 4))) for _ in range(n)]
  prompts += [prompts[1], prompts[2], prompts[5], prompts[1]]
  targets += [targets[1], [7, 8], targets[5], targets[1]]
  return make_batch(prompts, targets)


def horen(**kw):
  base = dict(layer="model.layers.1.mlp.down_proj", n_iter=4, initial_capacity=8,
              hopfield_key_match_threshold=0.6,
              seed=5)
  base.update(kw)
  return CodebookSettings(**base)


def grace_settings(**kw):
  base = dict(method="grace", layer="model.layers.0.mlp.up_proj", n_iter=4, initial_capacity=8,
              normalize_codebook_keys=False, query_selection_strategy="last_prompt_token",
              grace_eps=3.0, seed=5)
  base.update(kw)
  return CodebookSettings(**base)


def run(model, st, batch, block, mesh=None, d=(128, 64)):
  book = state.init(st, *d)
  return edit.apply_edits(model, book, batch, st, block=block, progress=False, mesh=mesh)


def assert_same(a, b, tol=1e-5):
  (book_a, info_a), (book_b, info_b) = a, b
  for x, y in zip(info_a, info_b):
    assert (x["added"], x["index"], x["match"], x["edit_acc"]) == \
        (y["added"], y["index"], y["match"], y["edit_acc"])
    np.testing.assert_allclose([x["first_score"], x["loss_first"], x["loss_last"]],
                               [y["first_score"], y["loss_first"], y["loss_last"]], rtol=tol,
                               atol=tol)
  assert int(book_a.count) == int(book_b.count)
  np.testing.assert_array_equal(np.asarray(book_a.labels), np.asarray(book_b.labels))
  np.testing.assert_allclose(np.asarray(book_a.keys), np.asarray(book_b.keys), atol=1e-6)
  # Adam at edit_lr 1 divides by the root of the squared gradient, so the float noise of
  # batch-size-dependent matmul kernels (~1e-7) moves near-zero-gradient coordinates by up to ~1e-3
  # of the row's scale; a wrong starting row would differ by O(1) of it.
  va, vb = np.asarray(book_a.values), np.asarray(book_b.values)
  scale = np.maximum(np.abs(va).max(axis=1, keepdims=True), 1.0)
  assert np.all(np.abs(va - vb) <= 2e-3 * scale), np.abs(va - vb).max(axis=1)
  np.testing.assert_allclose(np.asarray(book_a.radius), np.asarray(book_b.radius), atol=1e-5)


@pytest.mark.parametrize("make", [horen, pytest.param(grace_settings, marks=pytest.mark.slow)],
                         ids=["horen", "grace"])
def test_block_equals_one_at_a_time(model, make):
  st = make()
  d = (128, 64) if st.method == "horen" else (64, 128)
  batch = edits_with_collisions()
  one = run(model, st, batch, block=1, d=d)
  blocked = run(model, st, batch, block=8, d=d)
  assert_same(one, blocked)
  rows = [x["index"] for x in one[1]]
  # The second block has edits on a row that an earlier edit of the same block trains.
  assert len(set(rows[8:])) < 8, rows
  if st.method == "horen":
    # The repeat of edit 1 reuses its row (in the same block as the edit 15 repeating it again).
    assert [x["added"] for x in one[1][12:]] == [False, True, False, False], one[1][12:]
    assert rows[12] == rows[15] == rows[1], rows
  # A block without shared rows is one wave; check it is exercised too.
  assert len(set(rows[:8])) == 8, rows


@pytest.mark.parametrize("method", ["horen", pytest.param("grace", marks=pytest.mark.slow)])
def test_training_forward_equals_full_edited_forward(model, method):
  """loss_last / edit_acc of each edit (training forward: the label window over a KV cache, from the
  residual after the layer for HoReN's down_proj, through the adapter hook for GRACE's up_proj)
  equal the CE / accuracy of the full edited model (adapter hook, all positions)."""
  cases = {"horen": (horen(), (128, 64)), "grace": (grace_settings(), (64, 128))}
  for st, d in (cases[method],):
    batch = edits_with_collisions(n=6, seed=8)
    for i in range(2):
      book, info = edit.apply_edit(model, state.init(st, *d), batch, i, st)
      logits = np.asarray(infer.edited_logits(
          model, book, jnp.asarray(batch.input_ids[i:i + 1]),
          jnp.asarray(batch.attention_mask[i:i + 1]), jnp.asarray(batch.prompt_len[i:i + 1]),
          settings=st), np.float64)[0]
      labels = batch.labels[i]
      where = labels != IGNORE
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      ce = -logp[where, labels[where]].mean()
      acc = (logits[where].argmax(-1) == labels[where]).mean()
      np.testing.assert_allclose(float(info.loss_last), ce, rtol=1e-4, atol=1e-5)
      assert float(info.edit_acc) == acc


@pytest.mark.slow  # about a minute: HoReN and GRACE, each compiled on one device and on the mesh
@pytest.mark.parametrize("shape", [(2, 4), (1, 8)], ids=["2x4", "1x8"])
def test_mesh_equals_one_device(model, shape):
  mesh = make_mesh(*shape)
  sharded = shard_model(model, mesh)
  batch = edits_with_collisions(n=16)  # 20 edits
  for st, d in ((horen(initial_capacity=64), (128, 64)),
                (grace_settings(initial_capacity=64), (64, 128))):
    single = run(model, st, batch, block=4, d=d)
    before = edit.compile_count()
    book, infos = run(sharded, st, batch, block=4, mesh=mesh, d=d)
    assert_same(single, (book, infos), tol=1e-4)
    assert_rows_split(book, mesh)
    compiled = edit.compile_count() - before
    assert compiled <= 1
    # More edits into the same capacity: no new program.
    before = edit.compile_count()
    book, _ = edit.apply_edits(sharded, book, batch, st, block=4, progress=False, mesh=mesh,
                               rows=range(8))
    assert edit.compile_count() == before
    assert_rows_split(book, mesh)


def assert_rows_split(book, mesh):
  """Every buffer split by row over all 8 devices (`data` major), each device C / 8 whole rows."""
  want = P(("data", "model")) if mesh.shape["data"] > 1 else P("model")
  for name in ("keys", "values", "labels", "radius"):
    buf = getattr(book, name)
    assert buf.sharding.spec == want and buf.sharding.mesh == mesh, (name, buf.sharding)
    shards = buf.addressable_shards
    assert len(shards) == 8 and shards[0].data.shape == (book.capacity // 8,) + buf.shape[1:]


def collective_shapes(compiled) -> list[str]:
  """The result shapes of the collectives of a compiled program (its HLO text)."""
  import re
  ops = r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
  return [m.group(1) for m in re.finditer(rf"= (\S+(?: \S+)*?) (?:{ops})(?:-start)?\(",
                                           compiled.as_text())]


@pytest.mark.slow  # about a minute: 40 edits on 1x1 and on 1x8 / 2x4, three settings
@pytest.mark.parametrize("shape,make,block", [
    ((1, 8), horen, 8),  # the block's matmul retrieval (one Hopfield step)
    ((2, 4), lambda **kw: horen(hopfield_retrieval_max_iter=3, hopfield_retrieval_alpha=0.5, **kw),
     4),  # edit-after-edit retrieval over the live rows, three Hopfield steps
    ((1, 8), grace_settings, 4),
], ids=["horen-1x8", "horen-3steps-2x4", "grace-1x8"])
def test_rows_split_over_the_mesh_equal_one_device(model, shape, make, block, tmp_path):
  """40 sequential edits with the codebook rows split over 8 devices make the decisions of one
  device (rows added / reused, scores, keys) and the same edited logits; neither the edit block
  nor inference moves the key matrix between devices; a saved sharded codebook loads back equal."""
  from horse_jax.editors.codebook import persist
  mesh = make_mesh(*shape)
  sharded = shard_model(model, mesh)
  batch = edits_with_collisions(n=36, seed=4)  # 40 edits
  st = make(initial_capacity=256)  # keys f32[256, d_in]: a shape nothing else in the programs has
  d = (64, 128) if st.method == "grace" else (128, 64)
  single = run(model, st, batch, block=block, d=d)
  book, infos = run(sharded, st, batch, block=block, mesh=mesh, d=d)
  assert_same(single, (book, infos), tol=1e-4)
  assert book.capacity == 256 and int(book.count) > 20
  assert_rows_split(book, mesh)
  ids, mask, plen = (jnp.asarray(x) for x in (batch.input_ids, batch.attention_mask,
                                              batch.prompt_len))
  want = np.asarray(infer.edited_logits(model, single[0], ids, mask, plen, settings=st))
  got = np.asarray(infer.edited_logits(sharded, book, ids, mask, plen, settings=st))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - np.asarray(infer.edited_logits(model, state.init(st, *d), ids, mask, plen,
                                                      settings=st))).max() > 1e-2  # edits matter

  # No collective of either program carries the keys (f32[256, d_in]): only per-query results.
  hyper, key = settings_lib.hyper_of(st), settings_lib.jit_key(st)
  programs = [
      infer._edited_logits.lower(sharded, book, ids, mask, plen, hyper, settings=key,
                                 mesh=mesh).compile(),
      edit._edit_block_jit.lower(sharded, book, *(jnp.asarray(x[:block]) for x in (
          batch.input_ids, batch.attention_mask, batch.labels, batch.prompt_len)),
          jnp.zeros((block, 2), jnp.int32), jnp.ones((block,), bool), hyper, settings=key,
          n_label=4, mesh=mesh).compile()]
  for compiled in programs:
    shapes = collective_shapes(compiled)
    assert shapes and not [s for s in shapes if f"[{book.capacity},{d[0]}]" in s], shapes

  # Save / load: the live rows come back, and placed on the mesh they give the same logits.
  persist.save(tmp_path / "cb", book, st)
  loaded, _ = persist.load(tmp_path / "cb")
  n = int(book.count)
  for name in ("keys", "values", "labels", "radius"):
    np.testing.assert_array_equal(np.asarray(getattr(loaded, name))[:n],
                                  np.asarray(getattr(book, name))[:n])
  placed = state.place(loaded, mesh)
  assert_rows_split(placed, mesh)
  np.testing.assert_array_equal(
      np.asarray(infer.edited_logits(sharded, placed, ids, mask, plen, settings=st)), got)


def test_capacity_stays_a_multiple_of_the_devices():
  """Placing a codebook grows its capacity to a multiple of the mesh's devices, and doubling keeps
  it one, so the rows always split evenly (here 6 devices: 2x3)."""
  st = horen(initial_capacity=4)
  mesh = make_mesh(2, 3)
  book = state.place(state.init(st, 128, 64), mesh)
  assert book.capacity == 6 and book.keys.addressable_shards[0].data.shape == (1, 128)
  assert state.planned_capacity(40, book.capacity) == 48
  book = state.place(state.grow(book, state.planned_capacity(40, book.capacity)), mesh)
  assert book.capacity == 48 and book.keys.sharding.spec == P(("data", "model"))
  assert state.specs(book, make_mesh(1, 1)).keys == P()  # one device: nothing to split
  assert state.place(state.init(st, 128, 64), make_mesh(1, 8)).capacity == 8
  with pytest.raises(ValueError, match="multiple"):
    state.specs(state.init(st, 128, 64), mesh)


def test_retrieve_live_equals_retrieve():
  """The chunked retrieval over live rows only (the editor's) picks what the full one picks."""
  from horse_jax.editors.codebook.retrieval import retrieve, retrieve_live
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(50, 16)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  queries = keys[:30] + 0.3 * rng.normal(size=(30, 16)).astype(np.float32)
  kw = dict(alpha=0.1, beta=20.0, eps=1e-5, threshold=0.7, normalize=True)
  fn = jax.jit(jax.vmap(lambda q, c, it: (retrieve(q, keys, c, max_iter=it, **kw)[:3],
                                          retrieve_live(q, keys, c, max_iter=it, chunk=8, **kw)[:3]),
                        in_axes=(0, 0, None)), static_argnums=2)
  counts = jnp.asarray(rng.integers(1, 51, 30), jnp.int32)
  for it in (0, 1, 2):
    (i_full, s_full, m_full), (i_live, s_live, m_live) = fn(jnp.asarray(queries), counts, it)
    np.testing.assert_array_equal(i_full, i_live)
    np.testing.assert_array_equal(m_full, m_live)
    np.testing.assert_allclose(s_full, s_live, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize,eps", [(True, 1e-5), (False, 1e-5), (True, 10.0)],
                         ids=["normalized", "raw", "converged-at-once"])
def test_block_retrieval_decides_as_one_at_a_time(normalize, eps):
  """The matmul retrieval of a block against the pre-block rows (block_retrieval) makes the decisions
  of edit-after-edit `retrieve_live`: reuse of pre-block rows, of rows appended earlier in the same
  block (near-repeats with the same label), and appends when labels differ."""
  rng = np.random.default_rng(7 if normalize else 8)
  d, n_pre, b = 24, 37, 16
  st = horen(normalize_codebook_keys=normalize, hopfield_retrieval_eps=eps,
             hopfield_key_match_threshold=0.9 if normalize else 20.0, hopfield_retrieval_beta=5.0,
             initial_capacity=64)
  book = state.init(st, d, 8)
  keys = rng.normal(size=(n_pre, d)).astype(np.float32) * (1.0 if normalize else 2.0)
  if normalize:
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  labels = rng.integers(0, 3, (n_pre, 2)).astype(np.int32)
  book = dataclasses.replace(book, keys=book.keys.at[1:n_pre + 1].set(keys),
                             labels=book.labels.at[1:n_pre + 1].set(labels),
                             count=jnp.asarray(n_pre + 1, jnp.int32))
  q = rng.normal(size=(b, d)).astype(np.float32)
  lab = rng.integers(0, 3, (b, 2)).astype(np.int32)
  q[:4] = keys[:4] + 0.02 * rng.normal(size=(4, d))  # near pre-block rows, their labels
  lab[:4] = labels[:4]
  for later, earlier in ((9, 5), (10, 5), (12, 6), (14, 7)):  # near-repeats inside the block
    q[later] = q[earlier] + 0.02 * rng.normal(size=d)
    lab[later] = lab[earlier] if later != 10 else lab[earlier] + 1  # 10: same key, other label
  if normalize:
    q /= np.linalg.norm(q, axis=1, keepdims=True)
  q[13] = keys[8]  # a pre-block key again, another label: its appended copy ties with row 9
  lab[13] = labels[8] + 1
  valid = np.ones(b, bool)
  valid[15] = False
  y_p = rng.normal(size=(b, 8)).astype(np.float32)
  args = (jnp.asarray(q), jnp.asarray(lab), jnp.asarray(valid), jnp.asarray(y_p))
  one_book, one = jax.jit(lambda bk: jax.lax.scan(
      lambda c, x: edit._decide_one(c, *x, settings=st), bk, args))(book)
  blk_book, blk = jax.jit(lambda bk: edit._decide_block(bk, *args, st))(book)
  added, index, score, match = (np.asarray(x) for x in one)
  np.testing.assert_array_equal(np.asarray(blk[0]), added)
  np.testing.assert_array_equal(np.asarray(blk[1]), index)
  np.testing.assert_array_equal(np.asarray(blk[3]), match)
  np.testing.assert_allclose(np.asarray(blk[2]), score, rtol=1e-5, atol=1e-5)
  assert int(blk_book.count) == int(one_book.count)
  np.testing.assert_array_equal(np.asarray(blk_book.keys), np.asarray(one_book.keys))
  np.testing.assert_array_equal(np.asarray(blk_book.labels), np.asarray(one_book.labels))
  # The case mix happened: pre-block reuse, in-block reuse of an appended row, and appends.
  assert not added[:4].all() and np.all(index[:4][~added[:4]] <= n_pre)
  in_block_reuse = (~added) & (index > n_pre) & valid
  assert in_block_reuse.any(), (added, index)
  assert added[10] and added[valid].sum() >= 6
  # The exact tie between row 9 and edit 13's own copy goes to the earlier row, as jnp.argmax does.
  assert added[13] and index[13] == 9, (added[13], index[13])


def test_edit_block_setting_sets_the_block(model, monkeypatch):
  """`editor.edit_block` is what apply_edits uses when no block is passed (not silently ignored)."""
  seen = []
  real = edit.edit_block

  def spy(model_, book, input_ids_BxT, *args, **kwargs):
    seen.append(input_ids_BxT.shape[0])
    return real(model_, book, input_ids_BxT, *args, **kwargs)

  monkeypatch.setattr(edit, "edit_block", spy)
  batch = edits_with_collisions(n=8)
  run(model, horen(edit_block=4), batch, block=None)
  assert seen == [4, 4, 4]  # 12 edits in blocks of 4
  from horse_jax import settings as settings_lib
  from horse_jax.editors.codebook.settings import from_resolved
  resolved = settings_lib.resolve("horen", overrides=["editor.edit_block=2"])
  assert from_resolved(resolved, model.config).edit_block == 2


def test_label_slots_and_per_row_hand_computed():
  labels = np.full((3, 4), IGNORE, np.int32)
  labels[0, :2] = [5, 6]
  labels[2, 1:4] = [7, 8, 9]
  idx, lab = edit.label_slots(jnp.asarray(labels), 7)
  np.testing.assert_array_equal(np.asarray(idx)[:5], [0, 1, 9, 10, 11])
  np.testing.assert_array_equal(np.asarray(lab), [5, 6, 7, 8, 9, IGNORE, IGNORE])
  token = jnp.asarray([1.0, 3.0, 2.0, 4.0, 6.0, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(edit.per_row(token, idx // 4, jnp.asarray(labels))),
                             [2.0, 0.0, 4.0])


def test_n_tokens_holds_every_block():
  labels = np.full((5, 8), IGNORE, np.int32)
  for i, n in enumerate([1, 4, 2, 3, 3]):
    labels[i, :n] = 1
  # Blocks of 2 (the last padded): 5, 5, 3 label positions; grain 2 * 4 / 8 = 1.
  assert edit._n_tokens(labels, 2, 4) == 5
  full = np.where(np.arange(8) < 4, 1, IGNORE)[None].repeat(5, axis=0)
  assert edit._n_tokens(full, 2, 4) is None  # 8 >= 2 x 4: nothing to gain
  assert edit._n_tokens(labels, 4, 4) == 10  # 10 in the first block, grain 2
  assert edit._n_tokens(labels, 1, 4) is None


@pytest.mark.parametrize("make", [horen, grace_settings])
def test_gathered_head_equals_whole_window(model, make):
  """The head and loss on the gathered label positions (n_tokens) give the block program's results
  of the head on the whole [B, W] window, through the residual fast path (HoReN down_proj) and the
  adapter path (GRACE up_proj)."""
  st = make(n_iter=3)
  d = (128, 64) if st.method == "horen" else (64, 128)
  batch = edits_with_collisions(n=8, seed=4)
  sl = slice(0, 8)
  width = edit._n_label(batch.labels[sl], batch.prompt_len[sl])
  k = edit._n_tokens(batch.labels[sl], 8, width)
  assert k is not None and k < 8 * width
  keys = np.stack([state.label_key(batch.labels[i], int(batch.attention_mask[i].sum()),
                                   st.label_match) for i in range(8)])
  out = []
  for n_tokens in (None, k):
    book = state.ensure_room(state.init(st, *d), 8)
    out.append(edit.edit_block(model, book, batch.input_ids[sl], batch.attention_mask[sl],
                               batch.labels[sl], batch.prompt_len[sl], keys, np.ones(8, bool),
                               settings=st, n_label=width, n_tokens=n_tokens))
  (book_a, info_a), (book_b, info_b) = out
  for x, y in zip(info_a, info_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(np.asarray(book_a.values), np.asarray(book_b.values), atol=2e-3)
  np.testing.assert_allclose(np.asarray(book_a.lora_b), np.asarray(book_b.lora_b), atol=2e-3)
