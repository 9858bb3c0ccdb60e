"""Resume of every sequential method in a sweep: UltraEdit, ROME/MEMIT/AlphaEdit, DEFER, WISE and a
hypernetwork method run as a stream (`sequential_step`) save their edit state at each checkpoint
(`horse_jax.io.save_pytree`); a sweep stopped after a checkpoint and run again continues from that
state (no edit redone) and writes the curve of an uninterrupted run. Also: the pytree files
themselves, `sequential_step`'s errors, `--report` and table.md."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from _eval_helpers import eval_stopped_after, word_tokenizer

from horse_jax.cli.main import main
from horse_jax.errors import UserError
from horse_jax.eval import methods as methods_lib
from horse_jax.io import load_pytree, save_pytree
from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

WORDS = "alice bob carol dave erin frank lives in paris rome oslo lima works at likes tea coffee is a".split()
CITIES = ["paris", "rome", "oslo", "lima"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny random llama (2 layers), its word tokenizer, 6 edit records and a statistics corpus."""
  root = tmp_path_factory.mktemp("stream_state")
  tok = word_tokenizer(WORDS, vocab_size=48)
  cfg = tiny_llama_config(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  save_pretrained(random_model(cfg, seed=0), root / "model", tokenizer_src=tok)
  rows = [{"prompt": f"{PEOPLE[i]} lives in", "subject": PEOPLE[i], "target": CITIES[(i * 3 + 1) % 4],
           "rephrase": f"{PEOPLE[i]} works in", "loc_prompt": f"{PEOPLE[(i + 1) % 6]} likes",
           "loc_answer": "tea"} for i in range(6)]
  (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (root / "corpus.txt").write_text("\n".join(f"{p} lives in {c} and likes tea" for p in PEOPLE
                                             for c in CITIES) + "\n")
  return root


def entry_for(method, world):
  """A fast sweep entry of `method` on the tiny model."""
  locate = {"layers": [0], "v_num_grad_steps": 3, "v_loss_layer": 1, "mom2_n_samples": 24,
            "stats_dir": str(world / "stats"), "context_templates": ["{}"]}
  return {
      "ultraedit": {"name": "ultraedit", "settings": {"editor": {"lr": 1e-2}}},
      "rome": {"name": "rome", "stats_corpus": str(world / "corpus.txt"), "settings": {"editor": locate}},
      "alphaedit": {"name": "alphaedit", "stats_corpus": str(world / "corpus.txt"),
                    "settings": {"editor": dict(locate, layers=[0, 1])}},
      "defer": {"name": "defer", "settings": {"editor": {"n_iter": 3, "edit_lr": 1e-2}}},
      "wise": {"name": "wise", "settings": {"editor": {"n_iter": 3, "context_templates": ["{}"]}}},
      "mend": {"name": "mend", "hypernet": "init", "sequential_step": 1},
  }[method]


def write_config(world, path, method):
  config = {"name": "stream", "model": str(world / "model"), "data": str(world / "edits.jsonl"),
            "n_edits": [1, 2, 4], "seeds": [0], "methods": [entry_for(method, world)],
            "eval": {"batch_size": 8, "immediate": False}}
  path.write_text(yaml.safe_dump(config))
  return str(path)


def curve(out):
  """curve.jsonl without the wall times (the only thing a resumed run may change)."""
  lines = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def _stop_resume_equals_whole(world, tmp_path, monkeypatch, method):
  config = write_config(world, tmp_path / "sweep.yaml", method)
  whole, out = tmp_path / "whole", tmp_path / "out"
  assert main(["eval", "--config", config, "--out", str(whole), "--quiet"]) == 0
  eval_stopped_after(monkeypatch, ["eval", "--config", config, "--out", str(out), "--quiet"], 2)
  assert [line["n_edits"] for line in curve(out)] == [1, 2]
  # --report tables and plots the finished cells of the stopped sweep.
  assert main(["eval", "--config", config, "--out", str(out), "--quiet", "--report"]) == 0
  assert "Unfinished sweep" in (out / "table.md").read_text()
  assert not json.loads((out / "results.json").read_text())["complete"]

  edited, loaded = [], []
  adapter = methods_lib.SEQUENTIAL[method]

  def count_edit(ctx, state, records):
    edited.extend(r.prompt for r in records)
    return adapter.edit(ctx, state, records)

  def count_load(ctx, options, seed, folder):
    state = adapter.load(ctx, options, seed, folder)
    loaded.append(int(state.inner.n_edits))
    return state

  monkeypatch.setitem(methods_lib.SEQUENTIAL, method,
                      methods_lib.SequentialMethod(adapter.start, count_edit, adapter.fns, adapter.save,
                                                   count_load))
  assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
  assert loaded == [2] and len(edited) == 2  # records 3 and 4 only, from the saved state
  assert curve(out) == curve(whole)
  table = (out / "table.md").read_text()
  assert f"| {method} | final |" in table and "Unfinished" not in table


def test_ultraedit_stream_resumes(world, tmp_path, monkeypatch):
  _stop_resume_equals_whole(world, tmp_path, monkeypatch, "ultraedit")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "alphaedit", "defer", "wise", "mend"])
def test_stream_resumes(world, tmp_path, monkeypatch, method):
  _stop_resume_equals_whole(world, tmp_path, monkeypatch, method)


def test_pytree_roundtrip_keeps_values_types_and_grown_shapes(tmp_path):
  rng = np.random.RandomState(3).get_state()
  tree = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "flag": jnp.bool_(True),
          "grown": jnp.ones((3, 2, 2), jnp.float32), "n": 7, "rng": rng, "none": None,
          "np": np.array([1, 2], np.int32)}
  save_pytree(tmp_path / "s", tree)
  like = dict(tree, grown=jnp.zeros((0, 2, 2), jnp.float32), n=0,
              rng=np.random.RandomState(0).get_state(), a=jnp.zeros((2, 3), jnp.float32))
  back = load_pytree(tmp_path / "s", like)
  assert isinstance(back["a"], jax.Array) and np.array_equal(back["a"], tree["a"])
  assert back["grown"].shape == (3, 2, 2) and back["n"] == 7
  assert back["flag"].shape == () and bool(back["flag"])
  assert isinstance(back["np"], np.ndarray) and back["np"].tolist() == [1, 2]
  restored = np.random.RandomState()
  restored.set_state(back["rng"])
  original = np.random.RandomState(3)
  assert np.array_equal(restored.rand(4), original.rand(4))
  with pytest.raises(UserError, match="has no"):
    load_pytree(tmp_path / "s", dict(like, extra=jnp.zeros(2)))
  with pytest.raises(UserError, match="that this state lacks"):
    load_pytree(tmp_path / "s", {k: v for k, v in like.items() if k != "n"})
  with pytest.raises(UserError, match="not a saved state"):
    load_pytree(tmp_path / "missing", like)


@pytest.mark.parametrize("entry, message", [
    ({"name": "horen", "sequential_step": 1}, "only HORSE, MALMEN and MEND"),
    ({"name": "mend", "hypernet": "init", "sequential_step": 0}, "a positive integer"),
    ({"name": "mend", "hypernet": "init", "sequential_step": True}, "a positive integer"),
])
def test_sequential_step_errors(world, tmp_path, capsys, entry, message):
  config = tmp_path / "bad.yaml"
  config.write_text(yaml.safe_dump({"name": "bad", "model": str(world / "model"),
                                    "data": str(world / "edits.jsonl"), "methods": [entry]}))
  assert main(["eval", "--config", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


def test_paper_table_layout():
  from horse_jax.eval import tables
  cells = [{"model": "m", "data": "d", "method": meth, "timing": timing, "n_edits": n, "seed": s,
            "seconds": 1.0, "summary": {"edit_acc": es, "rephrase_acc": 0.5, "loc_agree": 1.0,
                                        "overall": (es + 1.5) / 3}}
           for meth, timing in (("a", "final"), ("b", "at_once")) for n, es in ((1, 1.0), (10, 0.5))
           for s in (0, 1) if not (meth == "b" and n == 10)]
  cells.append(dict(cells[0], timing="immediate"))  # not part of the table
  text = tables.paper_table({"name": "x", "aggregate": tables.aggregate(cells)})
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0] == ("| method | timing | ES @1 | GS @1 | loc @1 | overall @1 | ES @10 | GS @10 | "
                     "loc @10 | overall @10 |")
  assert rows[1].startswith("| a | final | 1.000 ± 0.000 | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.833 ± 0.000 "
                            "| 0.500 ± 0.000 |")
  assert rows[2].endswith("| – | – | – | – |") and len(rows) == 3
