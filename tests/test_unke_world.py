"""UnKE on the embedded world: the generated UnKE file, and `horse-jax edit` / `eval` with it."""

import json
import os

import pytest

from horse_jax.cli.main import main
from horse_jax.data import unke
from horse_jax.world import generator

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                    "world")
MODEL = os.path.join(ROOT, "model")
DATA = os.path.join(ROOT, "data", "unke_test.json")
built = pytest.mark.skipif(not os.path.isfile(DATA), reason="checkpoints/world not built")


@pytest.fixture(scope="module")
def world():
  return generator.build_world(0, generator.WorldSpec(n_subjects=120, n_train_subjects=40,
                                                      n_val_subjects=10, n_test_subjects=30))


def test_unke_records_state_new_facts(world):
  before = [generator.to_zsre(e) for e in world.edits["test"]]
  records = generator.unke_records(world, n=12)
  assert records == generator.unke_records(world, n=12)  # deterministic
  assert [generator.to_zsre(e) for e in world.edits["test"]] == before  # other data untouched
  assert len({r["subject"] for r in records}) == 12
  for r in records:
    s = r["subject"]
    assert world.split_of[s] == "test" and s in r["question"] and s in r["para_question"]
    assert len(r["sub_question"]) == len(r["sub_answer"]) == 3
    for q, a in zip(r["sub_question"], r["sub_answer"]):
      assert s in q and a in r["answer"]
      relation = next(rel for rel in world.relations if a in rel.values)
      assert a != world.facts[s][relation.name]  # a new fact, not the pre-trained one
    assert len(r["answer"].split()) >= 25  # a paragraph, not a short answer


@built
def test_shipped_unke_file_is_the_generated_one():
  with open(os.path.join(ROOT, "world.json")) as f:
    report = json.load(f)
  world = generator.build_world(report["seed"], generator.WorldSpec(**report["world"]))
  with open(DATA) as f:
    assert json.load(f) == generator.unke_records(world)
  records = unke.load_unke(DATA)
  assert len(records) == 50 and all(unke.is_unke(r) for r in records)


@built
def test_hypernet_methods_refuse_unke_data(tmp_path, capsys):
  assert main(["edit", "--method", "horse", "--model", MODEL, "--data", DATA,
               "--out", str(tmp_path / "e")]) == 2
  assert "edited with --method horen or grace, not horse" in capsys.readouterr().err
  assert main(["eval", "--model", MODEL, "--data", DATA, "--method", "malmen", "--n-edits", "1",
               "--out", str(tmp_path / "s")]) == 2
  assert "UnKE (unstructured) records" in capsys.readouterr().err
  assert not (tmp_path / "s" / "results.json").exists()


@built
@pytest.mark.slow
def test_edit_unke_on_the_world_model(tmp_path):
  out = tmp_path / "horen"
  assert main(["edit", "--method", "horen", "--model", MODEL, "--data", DATA, "--eval", "generate",
               "--n-edits", "3", "--max-new-tokens", "8", "--set", "eval.batch_size=4",
               "--out", str(out)]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["n_edits"] == 3 and metrics["data_format"] == "unke" and metrics["max_new_tokens"] == 8
  summary = metrics["summary"]
  for prefix in ("", "pre_"):
    for kind in ("question", "para_question", "sub_question"):
      for name in ("bleu1", "rouge1_recall", "rouge2_recall", "rougeL_recall"):
        assert 0.0 <= summary[f"{prefix}{kind}_{name}"] <= 1.0
    assert 0.0 <= summary[f"{prefix}question_token_acc"] <= 1.0
  record = metrics["records"][0]
  assert len(record["generations"]["sub_question"]) == 3
  assert len(record["generations"]["question"].split()) <= 8
  assert metrics["compile_count"] == 1  # the first three records share the 64-token bucket
  assert (out / "codebook" / "settings.json").exists()


@built
@pytest.mark.slow
def test_eval_sweep_accepts_unke(tmp_path):
  out = tmp_path / "sweep"
  assert main(["eval", "--model", MODEL, "--data", DATA, "--method", "horen", "--method", "unedited",
               "--n-edits", "2", "--eval", "generate", "--set", "eval.max_new_tokens=4",
               "--set", "eval.batch_size=4", "--set", "sample=first", "--quiet", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  cells = {(c["method"], c["timing"]): c["summary"] for c in results["cells"]}
  assert set(cells) == {("horen", "final"), ("horen", "immediate"), ("unedited", "at_once")}
  assert cells["unedited", "at_once"]["question_rougeL_recall"] is not None
  assert "question ROUGE-L R" in (out / "results.md").read_text()


def test_world_build_writes_the_unke_file(world, tmp_path):
  from horse_jax.world import build
  paths = build.write_data(world, str(tmp_path))
  with open(paths["unke_test"]) as f:
    assert json.load(f) == generator.unke_records(world)
