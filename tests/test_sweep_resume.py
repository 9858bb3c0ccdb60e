"""Sequential sweeps over a stream of edits: stopped between checkpoints (in-process) or killed with
SIGKILL (a subprocess, slow), a re-run of the same command resumes from the last finished checkpoint
without redoing it and writes the curve.jsonl of an uninterrupted run; `eval.score_sample` scores
the stated seeded sample."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from _eval_helpers import eval_stopped_after, word_tokenizer

from horse_jax.cli.main import main
from horse_jax.eval import methods as methods_lib
from horse_jax.eval import sweep
from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "alice bob carol dave erin frank lives in paris rome oslo lima works at likes tea coffee".split()
CITIES = ["paris", "rome", "oslo", "lima"]
CODEBOOK = {"editor": {"n_iter": 2, "initial_capacity": 4}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny random llama, its word tokenizer and 8 edit records (tests/test_sweep.py style)."""
  root = tmp_path_factory.mktemp("stream")
  tok = word_tokenizer(WORDS, vocab_size=48)
  cfg = tiny_llama_config(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  save_pretrained(random_model(cfg, seed=0), root / "model", tokenizer_src=tok)
  people = ["alice", "bob", "carol", "dave", "erin", "frank"]
  rows = [{"prompt": f"{people[i % 6]} lives in", "target": CITIES[(i * 3 + 1) % 4],
           "rephrase": f"{people[i % 6]} works in", "loc_prompt": f"{people[(i + 1) % 6]} likes",
           "loc_answer": "tea"} for i in range(8)]
  (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return root


def write_config(world, path, **changes):
  config = {"name": "stream", "model": str(world / "model"), "data": str(world / "edits.jsonl"),
            "n_edits": [1, 2, 4], "seeds": [0],
            "methods": [{"name": "horen", "settings": CODEBOOK}], "eval": {"batch_size": 8}}
  config.update(changes)
  path.write_text(yaml.safe_dump(config))
  return str(path)


def curve(out):
  """curve.jsonl without the wall times (the only thing a resumed run may change)."""
  lines = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def test_stopped_between_checkpoints_resumes(world, tmp_path, monkeypatch):
  config = write_config(world, tmp_path / "sweep.yaml")
  whole = tmp_path / "whole"
  assert main(["eval", "--config", config, "--out", str(whole), "--quiet"]) == 0

  # The same sweep, stopped once the line of checkpoint 2 is on disk.
  out = tmp_path / "out"
  eval_stopped_after(monkeypatch, ["eval", "--config", config, "--out", str(out), "--quiet"], 2)
  assert [line["n_edits"] for line in curve(out)] == [1, 2]
  assert not (out / "horse-jax.json").exists()  # not finished: `horse-jax info` says partial
  saved = json.loads(next((out / "streams").rglob("stream.json")).read_text())
  assert saved["n_edits"] == 2 and len(saved["immediate"]) == 2

  # Another sweep into that folder is refused, and touches nothing.
  other = write_config(world, tmp_path / "other.yaml", seeds=[1])
  before = (out / "curve.jsonl").read_bytes()
  assert main(["eval", "--config", other, "--out", str(out), "--quiet"]) == 2
  assert (out / "curve.jsonl").read_bytes() == before

  # The re-run edits only records 3 and 4, starting from the saved codebook of 2 edits.
  edited, loaded = [], []
  horen = methods_lib.SEQUENTIAL["horen"]

  def count_edit(ctx, state, records):
    edited.extend(r.prompt for r in records)
    return horen.edit(ctx, state, records)

  def count_load(ctx, options, seed, folder):
    state = horen.load(ctx, options, seed, folder)
    loaded.append(int(state[1].n_edits))
    return state

  monkeypatch.setitem(methods_lib.SEQUENTIAL, "horen",
                      dataclasses.replace(horen, edit=count_edit, load=count_load))
  assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
  assert loaded == [2] and len(edited) == 2
  assert curve(out) == curve(whole)
  results, expected = (json.loads((d / "results.json").read_text()) for d in (out, whole))
  strip = lambda cells: [{k: v for k, v in c.items() if k != "seconds"} for c in cells]  # noqa: E731
  assert results["complete"] and strip(results["cells"]) == strip(expected["cells"])
  assert (out / "horse-jax.json").exists() and not (out / "streams").exists()
  assert sorted(p.name for p in (out / "curves").iterdir()) == ["model__edits.jsonl.png"]
  # A finished sweep re-run: nothing is edited again.
  edited.clear()
  assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
  assert edited == [] and curve(out) == curve(whole)
  # --overwrite starts over: every edit again, the same curve.
  assert main(["eval", "--config", config, "--out", str(out), "--quiet", "--overwrite"]) == 0
  assert len(edited) == 4 and curve(out) == curve(whole)


def _fake_start(ctx, options, seed):
  return 0


def _fake_edit(ctx, state, records):
  return state + len(records)


def _fake_fns(ctx, state):
  """A model whose logits favour the label at answer positions of odd label id (a rule of each
  record alone, so its scores do not depend on which records share its batch)."""
  pre = ctx.logits_fn(ctx.model)

  def fn(batch):
    logits = np.array(pre(batch))
    b, t = np.nonzero((batch.labels != -100) & (batch.labels % 2 == 1))
    logits[b, t, batch.labels[b, t]] = logits.max() + 10.0
    return logits

  return fn, None


def test_score_sample_scores_the_stated_sample(world, tmp_path, monkeypatch):
  """At n=8 > score_sample=3 three of the eight edits are scored, those named in the line, and their
  scores are the full run's scores of the same records; n=2 is scored whole."""
  monkeypatch.setitem(methods_lib.SEQUENTIAL, "fake_seq",
                      methods_lib.SequentialMethod(_fake_start, _fake_edit, _fake_fns))
  runs = {}
  for sample in (None, 3):
    config = write_config(world, tmp_path / f"s{sample}.yaml", n_edits=[2, 8], seeds=[5],
                          methods=["unedited", "fake_seq"],
                          eval={"batch_size": 8, "score_sample": sample, "immediate": False})
    out = tmp_path / f"out{sample}"
    assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
    runs[sample] = out
  lines = {(x["method"], x["n_edits"]): x for x in curve(runs[3])}
  want = sorted(np.random.default_rng([5, 8]).choice(8, 3, replace=False).tolist())
  for method in ("unedited", "fake_seq"):
    assert lines[(method, 2)]["scored"] == 2 and "scored_indices" not in lines[(method, 2)]
    line = lines[(method, 8)]
    assert line["scored"] == 3 and line["scored_indices"] == want
    timing = "final" if method == "fake_seq" else "at_once"
    assert line["summary"][timing]["n_records"] == 3
    cell_dir = runs[3] / "cells" / "model" / "edits.jsonl" / method
    cell = json.loads((cell_dir / f"n8_seed5_{timing}.json").read_text())
    assert cell["scored"] == want and len(cell["records"]) == 3
    full = json.loads((runs[None] / "cells" / "model" / "edits.jsonl" / method /
                       f"n8_seed5_{timing}.json").read_text())
    for key in ("edit_acc", "rephrase_acc", "loc_agree"):
      assert [r[key] for r in cell["records"]] == [full["records"][i][key] for i in want]
      assert line["summary"][timing][key] == pytest.approx(np.mean([full["records"][i][key] for i in want]))
  results = json.loads((runs[3] / "results.json").read_text())
  assert {c["scored"] for c in results["cells"] if c["n_edits"] == 8} == {3}
  assert "score a seeded random sample of 3" in (runs[3] / "results.md").read_text()
  assert sweep.scored_indices(8, None, 5).tolist() == list(range(8))
  assert sweep.scored_indices(3, 3, 5).tolist() == [0, 1, 2]


# A driver for the kill -9 test: the sweep of `horse-jax eval`, whose codebook editing hangs after
# its third edit, so that the test kills it between checkpoints 2 and 4.
HANG = """
import dataclasses, sys, time
from horse_jax.eval import methods
m = methods.SEQUENTIAL["{method}"]
def edit(ctx, state, records):
  state = m.edit(ctx, state, records)
  if int(state[1].n_edits) >= 3:
    time.sleep(3600)
  return state
methods.SEQUENTIAL["{method}"] = dataclasses.replace(m, edit=edit)
from horse_jax.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["horen", "grace"])
def test_sigkill_between_checkpoints_resumes(world, tmp_path, method):
  config = write_config(world, tmp_path / "sweep.yaml", seeds=[0, 1],
                        methods=[{"name": method, "settings": CODEBOOK}])
  whole, out = tmp_path / "whole", tmp_path / "out"
  assert main(["eval", "--config", config, "--out", str(whole), "--quiet"]) == 0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", HANG.format(method=method), "eval", "--config", config,
                           "--out", str(out), "--quiet"], env=env, cwd=ROOT)
  try:
    while not (out / "curve.jsonl").exists() or len((out / "curve.jsonl").read_text().splitlines()) < 2:
      assert proc.poll() is None, "the sweep ended before it was killed"
      time.sleep(0.2)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert [x["n_edits"] for x in curve(out)] == [1, 2]
  assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
  assert curve(out) == curve(whole)
