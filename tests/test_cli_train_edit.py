"""`horse-jax train` / `horse-jax edit` for the hypernetwork methods on a tiny llama checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

from horse_jax.cli.main import main
from horse_jax.editors.hypernet.checkpoint import load_hypernet
from horse_jax.models import from_pretrained, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

SUBJECTS = [f"s{i}" for i in range(30)]
ANSWERS = [f"a{i}" for i in range(12)]
WORDS = ["what", "is", "the", "colour", "of", "tell", "me", "which", "city", "has", "?", "q"] + SUBJECTS + ANSWERS


def tiny_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>"), len(vocab)


def zsre_rows(rng, n):
  rows = []
  for _ in range(n):
    s, t = rng.choice(SUBJECTS, 2, replace=False)
    rows.append({"src": f"what is the colour of {s} ?", "alt": " ".join(rng.choice(ANSWERS, rng.integers(1, 3))),
                 "rephrase": f"tell me the colour of {s} ?", "loc": f"q which city has {t}",
                 "loc_ans": str(rng.choice(ANSWERS)), "answers": ["a0"]})
  return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("hn")
  tok, vocab = tiny_tokenizer()
  tok_dir = root / "tok"
  tok.save_pretrained(str(tok_dir))
  model = random_model(tiny_llama_config(vocab_size=vocab, num_layers=3), seed=0)
  save_pretrained(model, str(root / "llama"), tokenizer_src=str(tok_dir))
  rng = np.random.default_rng(0)
  for name, n in (("train.json", 40), ("valid.json", 12)):
    (root / name).write_text(json.dumps(zsre_rows(rng, n)))
  return root


def _train(ws, out, steps, *extra):
  return main(["train", "--model", str(ws / "llama"), "--data", str(ws / "train.json"),
               "--valid", str(ws / "valid.json"), "--method", "horse", "--out", str(out),
               "--steps", str(steps), "--save-every", "2", "--seed", "3",
               "--set", "data.n_edits=8", "--set", "data.batch_size=4", "--set", "editor.rank=16",
               "--set", "editor.meta_lr=1e-3", "--set", "editor.batch_size=16",
               "--set", "model.edit_modules=[model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj]",
               *extra])


def _leaves(path):
  _, state, _ = load_hypernet(path)
  return jax.tree_util.tree_leaves((state.nets, state.norms))


@pytest.mark.slow
def test_train_resume_is_bitwise_identical(workspace):
  straight, resumed = workspace / "straight", workspace / "resumed"
  assert _train(workspace, straight, 4) == 0
  assert _train(workspace, resumed, 2) == 0
  # A run killed after logging step 3 but before its checkpoint: the resumed run rewrites that line.
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "gen_loss": -1.0}) + "\n{\"step\": 4, \"trunc")
  assert _train(workspace, resumed, 4) == 0
  a, b = _leaves(straight / "hypernet"), _leaves(resumed / "hypernet")
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(r["gen_loss"] >= 0 for r in rows)
  assert "valid_edit_acc" in rows[1] and "valid_rephrase_acc" in rows[3]
  # The trained net differs from a fresh one (training did something).
  assert any(np.abs(np.asarray(x)).max() > 0 for x in a)


def test_edit_writes_deltas_model_and_metrics(workspace):
  out = workspace / "edit"
  rc = main(["edit", "--model", str(workspace / "llama"), "--data", str(workspace / "valid.json"),
             "--method", "malmen", "--hypernet", "init", "--out", str(out), "--n-edits", "6",
             "--max-shard-size", "20KB", "--set", "editor.rank=8",
             "--set", "editor.lr=1e-2", "--set", "data.batch_size=4",
             "--set", "model.edit_modules=[model.layers.2.mlp.down_proj]"])
  assert rc == 0
  from safetensors.numpy import load_file
  deltas = load_file(str(out / "deltas.safetensors"))
  assert list(deltas) == ["model.layers.2.mlp.down_proj.weight"]
  base = from_pretrained(str(workspace / "llama"))
  edited = from_pretrained(str(out / "model"))
  index = json.loads((out / "model" / "model.safetensors.index.json").read_text())  # --max-shard-size
  assert len(set(index["weight_map"].values())) > 1
  d = deltas["model.layers.2.mlp.down_proj.weight"]
  assert d.dtype == np.float32 and np.abs(d).max() > 0
  k0 = np.asarray(base.params["model"]["layers"]["2"]["mlp"]["down_proj"]["kernel"])
  k1 = np.asarray(edited.params["model"]["layers"]["2"]["mlp"]["down_proj"]["kernel"])
  np.testing.assert_allclose(k1 - k0, d.T, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(edited.params["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]),
                                np.asarray(base.params["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]))
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["method"] == "malmen" and metrics["n_edits"] == 6 and len(metrics["records"]) == 6
  assert metrics["summary"]["edit_acc"] is not None
  # transformers loads the edited checkpoint with the same weights.
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"))
  w = hf.state_dict()["model.layers.2.mlp.down_proj.weight"].float().numpy()
  np.testing.assert_allclose(w, k1.T, atol=1e-6)


def test_nan_loss_names_the_step(workspace, capsys):
  rc = _train(workspace, workspace / "nan", 1, "--set", "editor.lr=.nan")
  assert rc == 2
  assert "step 1" in capsys.readouterr().err


def test_memo_setting_decides_how_steps_get_their_cache(workspace, tmp_path, capsys, monkeypatch):
  """`editor.memo_cache_mb` is read: by default the steps read the memo of the training records;
  0 or a budget too small for it recompute the cache every step (and the run says why); the
  resulting hypernetworks agree."""
  from horse_jax.editors.hypernet import program
  calls = {"memo": 0, "computed": 0}
  real_memo, real_full = program.train_program_memo, program.train_program

  def count(key, fn):
    def wrapped(*args, **kwargs):
      calls[key] += 1
      return fn(*args, **kwargs)
    return wrapped

  monkeypatch.setattr(program, "train_program_memo", count("memo", real_memo))
  monkeypatch.setattr(program, "train_program", count("computed", real_full))
  assert _train(workspace, tmp_path / "memo", 2) == 0
  assert calls == {"memo": 2, "computed": 0}
  assert "memo of the training keys / value gradients: 40 records" in capsys.readouterr().out
  assert _train(workspace, tmp_path / "off", 2, "--set", "editor.memo_cache_mb=0") == 0
  assert calls == {"memo": 2, "computed": 2}
  capsys.readouterr()
  # with 1 MiB per memo row, 40 records cannot fit a 1 MiB budget
  monkeypatch.setattr("horse_jax.editors.hypernet.memo.row_bytes", lambda cfg: 2 ** 20)
  assert _train(workspace, tmp_path / "small", 2, "--set", "editor.memo_cache_mb=1") == 0
  assert calls == {"memo": 2, "computed": 4}
  assert "> editor.memo_cache_mb=1; every step recomputes them" in capsys.readouterr().out
  for a, b in zip(_leaves(tmp_path / "memo" / "hypernet"), _leaves(tmp_path / "off" / "hypernet")):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-3 * np.abs(np.asarray(b)).max() + 1e-9)
