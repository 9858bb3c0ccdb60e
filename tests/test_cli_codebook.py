"""`horse-jax edit --method horen|grace` on a tiny llama checkpoint: outputs, continuation, errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from _eval_helpers import word_tokenizer

from horse_jax.cli.main import main
from horse_jax.editors.codebook import load, load_edited_model
from horse_jax.data.tokenize import tokenize_edits
from horse_jax.models import load_tokenizer, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

SUBJECTS = [f"s{i}" for i in range(20)]
ANSWERS = [f"a{i}" for i in range(10)]
WORDS = ["what", "is", "the", "colour", "of", "tell", "me", "which", "city", "has", "?", "q"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  root = tmp_path_factory.mktemp("cb")
  tok = word_tokenizer(WORDS + SUBJECTS + ANSWERS)
  tok.save_pretrained(str(root / "tok"))
  model = random_model(tiny_llama_config(vocab_size=len(tok), num_layers=3), seed=0)
  save_pretrained(model, str(root / "llama"), tokenizer_src=str(root / "tok"))
  rng = np.random.default_rng(0)
  rows = []
  for i in range(6):
    s, t = SUBJECTS[i], SUBJECTS[10 + i]
    rows.append({"src": f"what is the colour of {s} ?", "alt": str(rng.choice(ANSWERS)),
                 "rephrase": f"tell me the colour of {s} ?", "loc": f"q which city has {t}",
                 "loc_ans": str(rng.choice(ANSWERS)), "answers": ["a0"]})
  (root / "zsre.json").write_text(json.dumps(rows))
  return root


def _edit(ws, out, method="horen", *extra):
  return main(["edit", "--method", method, "--model", str(ws / "llama"), "--data",
               str(ws / "zsre.json"), "--out", str(out), "--set", "editor.n_iter=3",
               "--set", "editor.initial_capacity=4", *extra])


@pytest.mark.slow
def test_horen_cli_outputs_and_continuation(ws):
  out = ws / "horen"
  assert _edit(ws, out, "horen", "--n-edits", "4", "--eval-every", "2") == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["method"] == "horen" and metrics["n_edits"] == 4
  assert len(metrics["records"]) == 4 and "edit_acc" in metrics["summary"]
  assert "loc_agree" in metrics["summary"]
  assert len(metrics["immediate"]["records"]) == 4
  assert metrics["settings"]["editor"]["layer"] == "model.layers.2.mlp.down_proj"  # round(0.9 * 3)
  lines = (out / "progress.jsonl").read_text().splitlines()
  assert [json.loads(x)["n_edits"] for x in lines] == [2, 4]
  for name in ("settings.json", "codebook.safetensors", "state"):
    assert (out / "codebook" / name).exists()
  book, settings = load(out / "codebook")
  assert int(book.n_edits) == 4 and settings.n_iter == 3

  # Edited model = base checkpoint + codebook folder; its logits equal the scored ones' source.
  edited = load_edited_model(ws / "llama", out / "codebook")
  tok = load_tokenizer(ws / "llama")
  batch = tokenize_edits(tok, ["what is the colour of s0 ?"], ["a1"])
  logits = edited.logits(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                         jnp.asarray(batch.prompt_len))
  assert logits.shape[:2] == batch.input_ids.shape

  # Continue from the saved codebook with two more edits.
  more = ws / "horen2"
  assert _edit(ws, more, "horen", "--n-edits", "2", "--codebook", str(out / "codebook")) == 0
  book2, _ = load(more / "codebook")
  assert int(book2.n_edits) == 6 and int(book2.count) >= int(book.count)


@pytest.mark.slow
def test_grace_cli_generate(ws):
  out = ws / "grace"
  assert _edit(ws, out, "grace", "--n-edits", "3", "--eval", "generate") == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["method"] == "grace" and "gen_edit_acc" in metrics["summary"]
  assert metrics["settings"]["editor"]["normalize_codebook_keys"] is False


def test_cli_user_errors(ws, capsys):
  assert _edit(ws, ws / "bad", "horen", "--set", "editor.layer=model.layers.9.mlp.down_proj") == 2
  assert "model.layers.9.mlp.down_proj" in capsys.readouterr().err
  assert _edit(ws, ws / "bad2", "horen", "--set", "editor.query_selection_strategy=middle") == 2
  assert _edit(ws, ws / "bad3", "grace", "--codebook", str(ws / "nowhere")) == 2
