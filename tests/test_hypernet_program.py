"""The compiled edit / meta-training programs (packed sequences) equal the stage-by-stage oracle.

The oracle (tests/hypernet_oracle.py: `predict`, `train_step_reference`) is itself checked against
NumPy float64 and `jax.grad` in test_hypernet_shifts.py / test_hypernet_meta.py; the edit program is
also compared with the NumPy implementation directly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.editors import hypernet
from horse_jax.editors.hypernet import packing, program
from horse_jax.editors.hypernet.packing import token_mask
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.names import default_edit_modules

import hypernet_oracle as oracle
from test_hypernet_shifts import batches_of, np_shifts, random_pairs, randomize


def rel(a, b):
  a, b = np.float64(a), np.float64(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def world():
  model = random_model(tiny_llama_config(num_layers=3), seed=4)
  rng = np.random.default_rng(1)
  edits = batches_of(random_pairs(rng, 24), 8)
  rephrase = batches_of(random_pairs(rng, 24), 8)
  loc = batches_of(random_pairs(rng, 24), 8)
  return model, edits, rephrase, loc


def make_cfg(model, method, n_mods=3, **kw):
  mods = tuple(default_edit_modules(model.config, n_mods))
  return hypernet.HypernetConfig(method=method, modules=mods,
                                 shapes=hypernet.module_shapes(model.params, mods), rank=12,
                                 chunk=16, token="all" if method == "mend" else "ans",
                                 lm_batch=8, loc_coef=0.7, lr=1e-2, meta_lr=1e-3, **kw)


def test_packing_keeps_sequences_and_order(world):
  _, edits, _, _ = world
  seqs = packing.sequences_from_batches(edits, "ans")
  p = packing.pack(seqs, 32, len(edits), chunk=16)
  flat_ids = p.input_ids.reshape(-1)
  # Every sequence appears whole, with positions 0..n-1 and one segment id.
  real = [(np.asarray(b.input_ids[i])[np.asarray(b.attention_mask[i]) == 1], j)
          for j, b in enumerate(edits) for i in range(b.input_ids.shape[0])]
  assert len(seqs) == len(real) and int((p.segment_ids > 0).sum()) == sum(len(r) for r, _ in real)
  # Cached rows: reference order (mini-batch by mini-batch, row-major) and token ids at those rows.
  want = np.concatenate([np.asarray(b.input_ids).reshape(-1)[token_mask(b, "ans").reshape(-1)]
                         for b in edits])
  n = int(p.row_valid.sum())
  np.testing.assert_array_equal(flat_ids[p.rows[:n]], want)
  np.testing.assert_array_equal(p.batch_rows, [token_mask(b, "ans").sum() for b in edits])
  # Label weights: 1 / label tokens of the mini-batch, so they sum to the number of mini-batches.
  np.testing.assert_allclose(p.label_weight.sum(), len(edits), rtol=1e-6)
  assert p.input_ids.shape[0] % 8 == 0


@pytest.mark.parametrize("method,spread", [
    ("horse", "reference"), pytest.param("malmen", "reference", marks=pytest.mark.slow),
    pytest.param("mend", "reference", marks=pytest.mark.slow)])
def test_edit_program_matches_numpy(world, method, spread):
  model, edits, _, _ = world
  cfg = make_cfg(model, method, spread=spread)
  state = randomize(hypernet.init(cfg, jax.random.PRNGKey(1)), seed=7)
  got, new_state = hypernet.edit(state, model, cfg, edits)
  ref, _, cache, _, ref_state = oracle.predict(state, model, cfg, edits)
  rows = [int(token_mask(b, cfg.token).sum()) for b in edits]
  real = sum(rows)
  keys = {n: np.float64(cache.keys[n][:real]) for n in cfg.modules}
  grads = {n: np.float64(cache.grads[n][:real]) for n in cfg.modules}
  want = np_shifts(state, cfg, rows, keys, grads)
  for n in cfg.modules:
    assert rel(got[n], want[n]) <= 1e-4, (n, rel(got[n], want[n]))
    assert rel(got[n], ref[n]) <= 1e-4
  for a, b in zip(jax.tree_util.tree_leaves(new_state.norms), jax.tree_util.tree_leaves(ref_state.norms)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["horse", pytest.param("malmen", marks=pytest.mark.slow),
                                    pytest.param("mend", marks=pytest.mark.slow)])
def test_train_program_matches_stage_by_stage(world, method):
  model, edits, rephrase, loc = world
  cfg = make_cfg(model, method)
  state = randomize(hypernet.init(cfg, jax.random.PRNGKey(2)), seed=3)
  ref_state, ref_m = state, None
  packer = hypernet.Packer(cfg.chunk)
  got_state = jax.tree_util.tree_map(jnp.copy, state)  # the program donates its state
  for step in range(2):
    ref_state, ref_m = oracle.train_step_reference(ref_state, model, cfg, edits, rephrase, loc)
    got_state, got_m = hypernet.train_step(got_state, model, cfg, edits, rephrase, loc, packer=packer)
    if step == 0:
      compiled = program.train_program._cache_size()
    for k in ref_m:
      np.testing.assert_allclose(got_m[k], ref_m[k], rtol=2e-4, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_state.nets),
                          jax.tree_util.tree_leaves(ref_state.nets)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-3 * np.abs(np.asarray(b)).max() + 1e-9, err_msg=str(path))
  assert int(got_state.step) == 2
  assert program.train_program._cache_size() == compiled  # step 2 reuses step 1's program


@pytest.mark.parametrize("method", ["horse", pytest.param("malmen", marks=pytest.mark.slow)])
def test_programs_in_several_lm_chunks(world, method, monkeypatch):
  """The LM running over the packed rows chunk by chunk (`lax.scan`, chunks of 2 rows of 32 tokens)
  gives the same edit and meta-training steps as the references."""
  model, edits, _, _ = world
  monkeypatch.setattr(packing, "LM_CHUNK_TOKENS", 64)
  jax.clear_caches()  # programs traced with one chunk must not be reused for these shapes
  try:
    p = packing.pack(packing.sequences_from_batches(edits, "ans"), 32, len(edits), chunk=16)
    n = packing.lm_chunks(*p.input_ids.shape)
    assert n >= 2 and p.label_index.shape[0] % n == 0
    # Every real label lies in its chunk's block of label entries.
    per = p.label_index.shape[0] // n
    chunk_of = (p.label_index // 32) % n
    real = p.label_weight > 0
    np.testing.assert_array_equal(chunk_of[real], (np.arange(len(real)) // per)[real])
    test_edit_program_matches_numpy(world, method, "reference")
    test_train_program_matches_stage_by_stage(world, method)
  finally:
    monkeypatch.undo()
    jax.clear_caches()


def test_last_layer_at_labels_equals_full_layer(world):
  """`label_logits(trim=True)` (last layer at label positions only) gives the full pass's logits,
  captures and gradients w.r.t. module-output offsets, at every layer, label positions included."""
  model, edits, _, _ = world
  mods = tuple(default_edit_modules(model.config, 3))
  last = program.last_layer_modules(model, mods)
  assert last == (mods[-1],) and program.can_trim_last(model, mods)
  assert not program.can_trim_last(model, ("model.layers.2.self_attn.k_proj",))
  p = packing.pack(packing.sequences_from_batches(edits, "ans"), 32, len(edits), chunk=16)
  part = program.Packed(*(jnp.asarray(x) for x in p))
  h, bias = program.stream_below(model, part, 0)
  w, width, _ = h.shape
  n_labels = part.label_index.shape[0]
  rng = np.random.default_rng(0)
  dv = model.config.hidden_size
  full_offsets = {m: jnp.asarray(0.1 * rng.normal(size=(w, width, dv)), jnp.float32) for m in mods}

  def run(offsets, trim):
    label_off = {m: o.reshape(-1, dv)[part.label_index] if trim and m in last else o
                 for m, o in offsets.items()}
    logits, captured = program.label_logits(model, h, part, bias, 0,
                                            program.Hooks(capture=mods, offsets=label_off), trim)
    return program.weighted_ce(logits, part), (logits, captured)

  (loss_a, (logits_a, cap_a)), grads_a = jax.value_and_grad(run, has_aux=True)(full_offsets, False)
  (loss_b, (logits_b, cap_b)), grads_b = jax.value_and_grad(run, has_aux=True)(full_offsets, True)
  real = np.asarray(part.label_weight) > 0
  assert rel(loss_b, loss_a) < 1e-6
  np.testing.assert_allclose(np.asarray(logits_b)[real], np.asarray(logits_a)[real], rtol=1e-5,
                             atol=1e-5)
  for m in mods:
    a = np.asarray(cap_a[m]).reshape(-1, cap_a[m].shape[-1])[np.asarray(part.label_index)]
    b = np.asarray(cap_b[m]).reshape(-1, cap_b[m].shape[-1])
    if m not in last:
      b = b[np.asarray(part.label_index)]
    np.testing.assert_allclose(b[real], a[real], rtol=1e-5, atol=1e-6, err_msg=m)
    # Gradients w.r.t. the offsets: everywhere for lower layers; the trimmed layer's offsets only
    # exist at label positions, where the full pass's gradient is, and it is zero elsewhere.
    ga, gb = np.asarray(grads_a[m]).reshape(-1, dv), np.asarray(grads_b[m]).reshape(-1, dv)
    assert np.abs(ga).max() > 0
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6 * np.abs(ga).max(), err_msg=m)
  n_total = w * width
  assert n_labels < n_total


def test_cli_edit_runs_one_edit_program(tmp_path, monkeypatch):
  """`horse-jax edit --method horse` edits through `program.edit_program`: one call for all edits."""
  import json
  from horse_jax.cli.main import main
  from horse_jax.models import save_pretrained
  from test_cli_train_edit import tiny_tokenizer, zsre_rows
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  save_pretrained(random_model(tiny_llama_config(vocab_size=vocab, num_layers=2), seed=0),
                  str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  (tmp_path / "edits.json").write_text(json.dumps(zsre_rows(np.random.default_rng(0), 6)))
  calls = []
  real = program.edit_program
  monkeypatch.setattr(program, "edit_program", lambda *a, **k: calls.append(1) or real(*a, **k))
  assert main(["edit", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "edits.json"),
               "--method", "horse", "--hypernet", "init", "--out", str(tmp_path / "out"), "--n-edits", "6",
               "--set", "editor.rank=8", "--set", "data.batch_size=4"]) == 0
  assert calls == [1]


def test_meta_lr_is_optimizer_state_and_compiles_nothing_new(world):
  """editor.meta_lr travels in the Adam state (optax.inject_hyperparams): a run with another meta_lr
  reuses the compiled training program, and its first Adam step is meta_lr times sign-like updates,
  so ten times the learning rate moves the weights ten times as far."""
  import dataclasses
  model, edits, rephrase, loc = world
  moved = {}
  for meta_lr in (1e-3, 1e-2):
    cfg = dataclasses.replace(make_cfg(model, "horse"), meta_lr=meta_lr)
    state = hypernet.init(cfg, jax.random.PRNGKey(5))
    before = jax.tree_util.tree_map(np.asarray, state.nets)
    after, _ = hypernet.train_step(state, model, cfg, edits, rephrase, loc,
                                   packer=hypernet.Packer(cfg.chunk))
    if meta_lr == 1e-3:
      compiled = program.train_program._cache_size()
    moved[meta_lr] = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(after.nets), jax.tree_util.tree_leaves(before))))
  assert program.train_program._cache_size() == compiled
  assert moved[1e-2] / moved[1e-3] == pytest.approx(10.0, rel=1e-2)
