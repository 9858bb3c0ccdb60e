"""A tiny sweep end to end from one CLI command: tiny random model, tiny tokenizer, built here."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from _eval_helpers import word_tokenizer
from horse_jax.cli.main import main
from horse_jax.eval import methods as methods_lib
from horse_jax.eval import tables
from horse_jax.models import Model, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

WORDS = "alice bob carol dave erin frank lives in paris rome oslo lima works at acme initech likes tea coffee".split()
CITIES = ["paris", "rome", "oslo", "lima"]


def make_records(n):
  people = ["alice", "bob", "carol", "dave", "erin", "frank"]
  rows = []
  for i in range(n):
    who = people[i % len(people)]
    rows.append({"prompt": f"{who} lives in", "target": CITIES[i % 4], "rephrase": f"{who} works in",
                 "loc_prompt": f"{people[(i + 1) % 6]} likes", "loc_answer": "tea coffee" if i % 2 else "tea"})
  return rows


def perturbed(model, scale, seed):
  """A different model: the LM head plus noise (stands in for an edited model)."""
  head = model.params["lm_head"]["kernel"]
  noise = scale * jax.random.normal(jax.random.PRNGKey(seed), head.shape, head.dtype)
  params = dict(model.params, lm_head={"kernel": head + noise})
  return Model(params, model.config)


def run_oracle(ctx, records, options, seed):
  """A fake editor: the pre-edit logits, but a share of answer positions (falling with the number
  of edits) made to predict their label; the share is drawn per seed."""
  share = float(options.get("share", 1.0)) / (1.0 + 0.5 * np.log(len(records)))
  pre_fn = ctx.logits_fn(ctx.model)

  def fn(batch):
    logits = np.array(pre_fn(batch))
    rng = np.random.default_rng(seed)
    b, t = np.nonzero((batch.labels != -100) & (rng.random(batch.labels.shape) < share))
    logits[b, t, batch.labels[b, t]] = logits.max() + 10.0
    return logits

  return ctx.score(records, fn)


def _seq_start(ctx, options, seed):
  return {"count": 0, "seed": seed}


def _seq_edit(ctx, state, records):
  return {"count": state["count"] + len(records), "seed": state["seed"]}


def _seq_fns(ctx, state):
  return ctx.logits_fn(perturbed(ctx.model, 0.02 * state["count"], state["seed"])), None


@pytest.fixture(autouse=True)
def _model_rank_promotion(world):
  """Runs strict unless the model code itself still relies on implicit rank promotion.

  (At the time of writing `horse_jax.models.layers.rms_norm` multiplies a [D] scale into [B, T, D];
  that is the models package's to fix. Scoring/metric code is tested strictly in its own files.)
  """
  from horse_jax.models import apply, from_pretrained
  model = from_pretrained(world / "model")
  try:
    apply(model, jnp.ones((1, 4), jnp.int32))
    yield
  except ValueError as err:
    if "rank_promotion" not in str(err):
      raise
    with jax.numpy_rank_promotion("allow"):
      yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  tok = word_tokenizer(WORDS, vocab_size=48)
  cfg = tiny_llama_config(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  model = random_model(cfg, seed=0)
  save_pretrained(model, root / "model", tokenizer_src=tok)
  data = root / "edits.jsonl"
  data.write_text("\n".join(json.dumps(r) for r in make_records(12)) + "\n")
  methods_lib.register_batch("test_oracle", run_oracle)
  methods_lib.register_sequential("test_seq", methods_lib.SequentialMethod(_seq_start, _seq_edit, _seq_fns))
  return root


def test_sweep_end_to_end(world, tmp_path):
  config = {
      "name": "tiny", "model": str(world / "model"), "data": str(world / "edits.jsonl"),
      "n_edits": [1, 4, 12, 50], "seeds": [0, 1],
      "methods": ["unedited", {"name": "test_oracle", "label": "oracle", "share": 0.9},
                  {"name": "test_seq", "label": "seq"}],
      "eval": {"batch_size": 8},
  }
  path = tmp_path / "sweep.yaml"
  path.write_text(yaml.safe_dump(config))
  out = tmp_path / "out"
  assert main(["eval", "--config", str(path), "--out", str(out), "--quiet"]) == 0

  results = json.loads((out / "results.json").read_text())
  assert results["complete"]
  cells = results["cells"]
  # 3 counts (50 > 12 records is skipped) x 2 seeds; the sequential method has two timings.
  assert len(cells) == 3 * 2 + 3 * 2 + 3 * 2 * 2
  assert sum("n_edits=50" in s for s in results["skipped"]) == 3
  assert {(c["method"], c["timing"]) for c in cells} == {("unedited", "at_once"), ("oracle", "at_once"),
                                                         ("seq", "final"), ("seq", "immediate")}
  for c in cells:
    assert c["summary"]["n_records"] == c["n_edits"]
    if c["method"] == "unedited":  # post = pre exactly
      assert c["summary"]["loc_agree"] == 1.0
      assert c["summary"]["edit_acc"] == c["summary"]["pre_edit_acc"]
  # The immediate score of edit 1 is on a model with 1 edit; the final score at n=12 on one with 12.
  seq = {(c["seed"], c["n_edits"], c["timing"]): c["summary"] for c in cells if c["method"] == "seq"}
  assert seq[(0, 1, "immediate")]["loc_agree"] == pytest.approx(seq[(0, 1, "final")]["loc_agree"])

  # Aggregates: mean and sample std over the two seeds, recomputed here from the cells.
  agg = results["aggregate"]
  assert len(agg) == 3 + 3 + 3 * 2
  for row in agg:
    vals = [c["summary"]["overall"] for c in cells if (c["method"], c["timing"], c["n_edits"]) ==
            (row["method"], row["timing"], row["n_edits"])]
    assert len(vals) == 2
    assert row["overall"]["mean"] == pytest.approx(np.mean(vals))
    assert row["overall"]["std"] == pytest.approx(np.std(vals, ddof=1))

  md = (out / "results.md").read_text()
  table = [line for line in md.splitlines() if line.startswith("| ")]
  assert table[0].startswith("| method | timing | n_edits | seeds | ES | GS | loc_acc | loc_agree | overall |")
  body = table[1:]
  assert len(body) == len(agg)
  assert body[0].startswith("| unedited | at_once | 1 | 2 |")
  assert any(line.startswith("| seq | immediate | 12 | 2 |") for line in body)
  assert "±" in body[0]

  pngs = list((out / "plots").glob("*.png"))
  assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(pngs[0]) > 10_000
  cell_files = list((out / "cells").rglob("*.json"))
  assert len(cell_files) == len(cells)
  one = json.loads(cell_files[0].read_text())
  assert set(one) >= {"method", "n_edits", "summary", "records"}
  assert len(one["records"]) == one["n_edits"]


def test_cli_flags_without_config_and_generation(world, tmp_path):
  out = tmp_path / "quick"
  code = main(["eval", "--model", str(world / "model"), "--data", str(world / "edits.jsonl"),
               "--method", "unedited", "--n-edits", "2", "--seeds", "3", "--eval", "generate",
               "--set", "sample=first", "--out", str(out), "--quiet"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  (cell,) = results["cells"]
  s = cell["summary"]
  assert s["gen_loc_agree"] == 1.0 and s["gen_edit_acc"] == s["pre_gen_edit_acc"]
  assert s["gen_overall_locality"] == "gen_loc_agree"
  assert "gen ES" in (out / "results.md").read_text()


def test_bad_inputs_fail_cleanly_and_write_nothing(world, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  rows = make_records(3)
  rows[1]["target"] = ""
  bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "out"
  code = main(["eval", "--model", str(world / "model"), "--data", str(bad), "--out", str(out), "--quiet"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "bad.jsonl: record 1" in err[0] and "'target'" in err[0]
  assert not out.exists()
  code = main(["eval", "--model", str(world / "model"), "--data", str(world / "edits.jsonl"), "--method", "nope",
               "--out", str(out), "--quiet"])
  assert code == 2 and "unknown method 'nope'" in capsys.readouterr().err
  assert not out.exists()
  # --skip-invalid keeps going with the valid records.
  code = main(["eval", "--model", str(world / "model"), "--data", str(bad), "--n-edits", "2", "--skip-invalid",
               "--out", str(out), "--quiet"])
  assert code == 0 and "skipped" in capsys.readouterr().err
  assert json.loads((out / "results.json").read_text())["cells"][0]["n_edits"] == 2


def test_mean_std():
  assert tables.mean_std([0.5, None, 1.0]) == {"mean": 0.75, "std": pytest.approx(np.std([0.5, 1.0], ddof=1)), "n": 2}
  assert tables.mean_std([None]) == {"mean": None, "std": None, "n": 0}
  assert tables.mean_std([0.25])["std"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["horse", "malmen", "horen", "grace"])
def test_real_editor_adapters(world, tmp_path, method):
  """The registry's adapters drive the real editors (fresh hypernetwork / empty codebook)."""
  out = tmp_path / method
  config = {"name": "adapters", "model": str(world / "model"), "data": str(world / "edits.jsonl"),
            "n_edits": [1, 3], "sample": "first",
            "methods": [{"name": method, "hypernet": "init"} if method in ("horse", "malmen") else method]}
  (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
  code = main(["eval", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out), "--quiet"])
  assert code == 0
  cells = json.loads((out / "results.json").read_text())["cells"]
  timings = {"at_once"} if method in ("horse", "malmen") else {"final", "immediate"}
  assert {c["timing"] for c in cells} == timings and {c["n_edits"] for c in cells} == {1, 3}
  if method in ("horen", "grace"):  # a codebook edit is scored right after it is made: ES = 1
    first = [c for c in cells if c["n_edits"] == 1 and c["timing"] == "immediate"][0]
    assert first["summary"]["edit_acc"] == 1.0


def test_a_hypernetwork_method_needs_an_explicit_network(world, tmp_path):
  """A HORSE/MALMEN/MEND entry without `hypernet:` is refused before any work, naming the entry."""
  code = main(["eval", "--model", str(world / "model"), "--data", str(world / "edits.jsonl"),
               "--method", "malmen", "--n-edits", "1", "--out", str(tmp_path / "out"), "--quiet"])
  assert code == 2 and not (tmp_path / "out").exists()


def test_sequential_without_immediate_scoring_edits_in_chunks(world, tmp_path):
  """Without immediate scoring the edits up to each count go to the editor in one call; the final
  scores must be those of the one-call-per-edit run (the fake editor's model depends on the count)."""
  finals = {}
  for immediate in (True, False):
    config = {"name": "tiny", "model": str(world / "model"), "data": str(world / "edits.jsonl"),
              "n_edits": [1, 4, 12], "seeds": [0], "methods": [{"name": "test_seq", "label": "seq"}],
              "eval": {"batch_size": 8, "immediate": immediate}}
    path = tmp_path / f"sweep_{immediate}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"out_{immediate}"
    assert main(["eval", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    finals[immediate] = {c["n_edits"]: c["summary"] for c in cells if c["timing"] == "final"}
  assert sorted(finals[False]) == [1, 4, 12]
  assert finals[False] == finals[True]
