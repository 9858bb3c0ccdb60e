"""`horse-jax edit --method defer|wise` on a tiny llama checkpoint, and the shipped hparams files
(the HoReN reference's llama3-8b settings) read as written."""

import json
import os

import numpy as np
import pytest
from test_cli_codebook import ws  # noqa: F401  (the tiny checkpoint + ZsRE workspace fixture)

from horse_jax import settings as settings_lib
from horse_jax.cli.main import main
from horse_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edit(ws, out, method, *extra):  # noqa: F811
  return main(["edit", "--method", method, "--model", str(ws / "llama"), "--data",
               str(ws / "zsre.json"), "--out", str(out), *extra])


def test_defer_hparams_file_as_written():
  r = settings_lib.resolve("defer", configs=[os.path.join(ROOT, "hparams/DEFER/llama3-8b.yaml")])
  assert r["editor.layer"] == "model.layers.29.mlp.down_proj"
  assert (r["editor.edit_lr"], r["editor.n_iter"], r["editor.threshold"]) == (7e-5, 100, 0.5)
  assert r.sources["editor.threshold"] == "config" and "model_name" in r.ignored


def test_wise_hparams_file_as_written():
  r = settings_lib.resolve("wise", configs=[os.path.join(ROOT, "hparams/WISE/llama3-8b.yaml")])
  assert r["editor.layer"] == "model.layers.29.mlp.down_proj" and r["model.dtype"] == "bfloat16"
  assert r["editor.act_margin"] == [5.0, 20.0, 10.0] and r["editor.n_iter"] == 70
  assert (r["editor.save_freq"], r["editor.merge_freq"], r["editor.densities"]) == (500, 1000, 0.53)
  assert r.typed.editor.merge_num == 2 and "sequential_edit" in r.ignored


def test_unknown_and_mismatched_keys_are_refused(tmp_path):
  bad = tmp_path / "x.yaml"
  bad.write_text("alg_name: DEFER\nthreshhold: 0.5\n")
  with pytest.raises(UserError, match="did you mean 'threshold'"):
    settings_lib.resolve("defer", configs=[bad])
  bad.write_text("alg_name: GRACE\nthreshold: 0.5\n")
  with pytest.raises(UserError, match="does not match --method defer"):
    settings_lib.resolve("defer", configs=[bad])
  bad.write_text("alg_name: DEFER\nbatch_size: 4\n")
  with pytest.raises(UserError, match="one request at a time"):
    settings_lib.resolve("defer", configs=[bad])
  bad.write_text("alg_name: WISE\nmerge_freq: 700\nsave_freq: 500\n")
  with pytest.raises(UserError, match="multiple of save_freq"):
    settings_lib.resolve("wise", configs=[bad])
  bad.write_text("alg_name: WISE\nretrieve: false\n")
  with pytest.raises(UserError, match="not implemented"):
    settings_lib.resolve("wise", configs=[bad])


def test_defer_cli_outputs(ws):  # noqa: F811
  out = ws / "defer"
  assert _edit(ws, out, "defer", "--n-edits", "3", "--eval-every", "2", "--set",
               "editor.n_iter=3", "editor.edit_lr=1e-3") == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["method"] == "defer" and metrics["n_edits"] == 3
  assert len(metrics["immediate"]["records"]) == 3 and "loc_agree" in metrics["summary"]
  assert metrics["settings"]["editor"]["layer"] == "model.layers.2.mlp.down_proj"
  assert metrics["effective_settings"]["editor.n_iter"] == {"value": 3, "source": "set"}
  assert [json.loads(x)["n_edits"] for x in (out / "progress.jsonl").read_text().splitlines()] == [2, 3]
  state = np.load(out / "state.npz")
  assert state["params.value_w"].shape == (128, 64) and int(state["n_edits"]) == 3


def _same_metrics(a, b):
  ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
  for key in ("edit_acc", "rephrase_acc", "loc_acc", "loc_agree"):
    assert ma["summary"][key] == pytest.approx(mb["summary"][key], abs=1e-6), key
  sa, sb = np.load(a / "state.npz"), np.load(b / "state.npz")
  assert sorted(sa.files) == sorted(sb.files)
  for name in sa.files:
    np.testing.assert_allclose(sa[name], sb[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("defer", ["editor.n_iter=3", "editor.edit_lr=1e-3"]),
    ("wise", ["editor.n_iter=3", "editor.save_freq=1", "editor.merge_freq=2"])])
def test_mesh_of_8_devices_equals_one_device(ws, method, extra):  # noqa: F811
  for name, mesh in (("one", []), ("mesh", ["--mesh", "2x4"])):
    assert _edit(ws, ws / f"{method}-{name}", method, "--n-edits", "4", "--set", *extra, *mesh) == 0
  _same_metrics(ws / f"{method}-one", ws / f"{method}-mesh")


def test_wise_cli_outputs(ws):  # noqa: F811
  out = ws / "wise"
  assert _edit(ws, out, "wise", "--n-edits", "3", "--set", "editor.n_iter=3", "editor.save_freq=1",
               "editor.merge_freq=2", "editor.context_templates=['{}', 'q {}']") == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["method"] == "wise" and metrics["n_edits"] == 3
  assert metrics["editor"]["memories"] == 2 and metrics["editor"]["merges"] == 1
  assert metrics["editor"]["context_templates"] == ["{}", "q {}"]
  state = np.load(out / "state.npz")
  assert state["memories"].shape == (2, 128, 64) and "rng" not in state.files


@pytest.mark.parametrize("method", ["defer", "wise"])
def test_plan_compiles_one_edit(method):
  from horse_jax.models import make_mesh
  from horse_jax.plan import plan
  result = plan(os.path.join(ROOT, "checkpoints/world/model"), method, 10, make_mesh(1, 2),
                overrides=["editor.n_iter=2"], seq_len=16)
  edit = [s for s in result["stages"] if s["name"] == "edit"][0]
  assert edit["flops"] > 0 and result["info"]["layer"].endswith("mlp.down_proj")
