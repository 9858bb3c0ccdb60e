"""The editor protocol is a thin layer: each method's Editor gives what its family's own functions give.

Expected values come from calling the editor packages directly (hypernet.edit/apply,
codebook.apply_edit/infer), the composition the protocol documents; plus the protocol's own rules
(two hypernet edit calls = edits on the edited model, shifts added; settings reach the editor).
"""

import jax
import numpy as np
import pytest
from _eval_helpers import word_tokenizer

from horse_jax import settings as settings_lib
from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import tokenize_edits
from horse_jax.editors import hypernet
from horse_jax.editors.codebook import edit as cb_edit, infer, state as cb_state
from horse_jax.editors.codebook.settings import from_resolved
from horse_jax.editors.protocol import make_editor
from horse_jax.errors import UserError
from horse_jax.models.init import random_model, tiny_llama_config

WORDS = ["what", "is", "the", "colour", "of", "?"] + [f"s{i}" for i in range(6)] + [f"a{i}" for i in range(4)]


@pytest.fixture(scope="module")
def setup():
  tok = word_tokenizer(WORDS)
  model = random_model(tiny_llama_config(vocab_size=len(tok), num_layers=2), seed=0)
  records = [EditRecord(prompt=f"what is the colour of s{i} ?", target=f"a{i % 4}") for i in range(3)]
  return tok, model, records


@pytest.mark.slow
def test_hypernet_editor_matches_the_family_functions(setup):
  tok, model, records = setup
  resolved = settings_lib.resolve("malmen", overrides=["editor.rank=4", "editor.lr=0.1",
                                                       "model.edit_modules=[model.layers.1.mlp.down_proj]"])
  editor = make_editor("malmen", model, tok, resolved)
  assert editor.kind == "at_once" and editor.config.rank == 4 and editor.config.lr == 0.1
  state = editor.init(jax.random.PRNGKey(1))
  state1, info = editor.edit(state, records[:2])
  assert info == {}
  # Direct: the same networks, the same batches.
  cfg = hypernet.from_settings("malmen", resolved, model)
  nets = hypernet.init(cfg, jax.random.PRNGKey(1))
  shifts, nets = hypernet.edit(nets, model, cfg, hypernet.edit_batches(tok, records[:2], cfg.lm_batch))
  name = "model.layers.1.mlp.down_proj"
  np.testing.assert_allclose(np.asarray(state1[1][name]), np.asarray(shifts[name]), rtol=1e-6, atol=1e-7)
  # A second call edits the edited model and adds its shifts.
  state2, _ = editor.edit(state1, records[2:])
  more, _ = hypernet.edit(nets, hypernet.apply(model, shifts), cfg,
                          hypernet.edit_batches(tok, records[2:], cfg.lm_batch))
  np.testing.assert_allclose(np.asarray(state2[1][name]), np.asarray(shifts[name] + more[name]),
                             rtol=1e-5, atol=1e-6)
  edited = editor.apply(state2)
  batch = tokenize_edits(tok, [r.prompt for r in records], [r.target for r in records])
  direct = hypernet.apply(model, {name: shifts[name] + more[name]})
  from horse_jax.models import apply
  np.testing.assert_allclose(np.asarray(edited.logits(batch)),
                             np.asarray(apply(direct, batch.input_ids, batch.attention_mask)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_codebook_editor_matches_the_family_functions(setup):
  tok, model, records = setup
  resolved = settings_lib.resolve("horen", overrides=["editor.n_iter=2", "editor.initial_capacity=4",
                                                      "editor.layer=model.layers[1].mlp.down_proj.weight"])
  editor = make_editor("horen", model, tok, resolved)
  assert editor.kind == "sequential" and editor.config.layer == "model.layers.1.mlp.down_proj"
  book, info = editor.edit(editor.init(jax.random.PRNGKey(0)), records)
  assert len(info) == 3 and all(np.isfinite(x["loss_last"]) for x in info)
  cfg = from_resolved(resolved, model.config)
  ref = cb_state.init(cfg, model.config.intermediate_size, model.config.hidden_size)
  for r in records:
    ref, _ = cb_edit.apply_edit(model, ref, tokenize_edits(tok, [r.prompt], [r.target]), 0, cfg)
  batch = tokenize_edits(tok, [r.prompt for r in records], [r.target for r in records])
  np.testing.assert_allclose(np.asarray(editor.apply(book).logits(batch)),
                             np.asarray(infer.logits_fn(model, ref, cfg)(batch)), rtol=1e-5, atol=1e-5)
  assert int(book.count) == int(ref.count)


def test_make_editor_refuses_mismatched_settings(setup):
  tok, model, _ = setup
  with pytest.raises(UserError, match="settings resolved for horen, not grace"):
    make_editor("grace", model, tok, settings_lib.resolve("horen"))
  with pytest.raises(UserError, match="model.layers.7.mlp.down_proj"):
    make_editor("grace", model, tok, settings_lib.resolve("grace", overrides=["editor.layer=model.layers.7.mlp.down_proj"]))


def test_no_library_module_imports_the_cli():
  """The CLI is a user of the library, never the other way round."""
  import pathlib
  import re
  root = pathlib.Path(__file__).resolve().parents[1] / "horse_jax"
  offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "cli" not in p.relative_to(root).parts
               and re.search(r"^\s*(from|import)\s+horse_jax\.cli\b", p.read_text(), flags=re.M)]
  assert offenders == []


def test_every_editor_returns_one_result_type(setup):
  """`apply` gives Edited(model, logits, generate, state, metrics, base) for both families: `base`
  is the unedited model, `model` carries the edit (HoReN: base + codebook, not the base alone)."""
  from horse_jax.editors.codebook.persist import EditedModel
  from horse_jax.editors.protocol import Edited
  from horse_jax.models import apply
  tok, model, records = setup
  batch = tokenize_edits(tok, [r.prompt for r in records], [r.target for r in records])
  runs = {"horen": ["editor.n_iter=2", "editor.initial_capacity=4",
                    "editor.layer=model.layers.1.mlp.down_proj"],
          "malmen": ["editor.rank=4", "editor.lr=0.1", "model.edit_modules=[model.layers.1.mlp.down_proj]"]}
  for method, overrides in runs.items():
    editor = make_editor(method, model, tok, settings_lib.resolve(method, overrides=overrides))
    state, _ = editor.edit(editor.init(jax.random.PRNGKey(0)), records)
    edited = editor.apply(state)
    assert type(edited) is Edited and edited.base is model and edited.state is state
    assert edited.metrics["method"] == method and edited.metrics["n_edits"] == len(records)
    base_logits = np.asarray(apply(model, batch.input_ids, batch.attention_mask))
    assert np.abs(np.asarray(edited.logits(batch)) - base_logits).max() > 1e-6, method  # edit applied
    if method == "horen":
      assert isinstance(edited.model, EditedModel) and edited.model.book is state
      np.testing.assert_allclose(
          np.asarray(edited.model.logits(batch.input_ids, batch.attention_mask, batch.prompt_len)),
          np.asarray(edited.logits(batch)), rtol=1e-5, atol=1e-5)
    else:
      assert edited.model is not model and edited.metrics["edit_modules"] == ["model.layers.1.mlp.down_proj"]
      np.testing.assert_allclose(np.asarray(apply(edited.model, batch.input_ids, batch.attention_mask)),
                                 np.asarray(edited.logits(batch)), rtol=1e-5, atol=1e-5)
