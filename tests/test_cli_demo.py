"""The demo end to end on the shipped world (slow: it compiles both editors)."""

import json
import os

import pytest

from horse_jax.cli.main import main


@pytest.mark.slow
def test_demo_writes_results_table_and_plot(tmp_path, capsys):
  out = tmp_path / "demo"
  assert main(["demo", "--n-edits", "8", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  for method in ("horse", "horen"):
    row = results[method]
    assert row["n_edits"] == 8
    for key in ("edit_acc", "rephrase_acc", "loc_acc", "loc_agree", "pre_edit_acc"):
      assert 0.0 <= row[key] <= 1.0, (method, key)
  # HoReN trains each edit until its own prompt is right: it must beat the unedited model.
  assert results["horen"]["edit_acc"] > results["horen"]["pre_edit_acc"]
  assert os.path.getsize(out / "demo.png") > 10_000
  printed = capsys.readouterr().out
  assert "| HORSE | after |" in printed and "| HoReN | after |" in printed


def test_demo_missing_world_is_one_line_error(tmp_path, capsys):
  assert main(["demo", "--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "missing from the world folder" in err[0]
