"""`benchmarks.reference` drives a checkout of the HoReN reference code and reports rows.

A clone has no reference checkout, so these tests build a FAKE one in tmp_path with the layout and
API the harness expects (`src/models/grace/grace_main.apply_grace_to_model`, its hparams class,
`hparams/GRACE/llama3-8b.yaml`, an `src/__init__.py` that must not run) and check that the harness
imports it, puts its CUDA tensors on the CPU, feeds it the records one request per call, and times
ours beside it. They test our harness, not the reference; nothing here asserts a timing.
"""

import os
import shutil
import sys
import textwrap

import pytest

from benchmarks import reference
from benchmarks.reference import harness, shim
from horse_jax.data import load_records

WORLD = "checkpoints/world/model"

FAKE_APPLY = '''
import torch
from ...util.calls import CALLS  # a relative import, as the reference's own

def apply_grace_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                         keep_original_weight=False, **kwargs):
  # the reference names CUDA devices everywhere; the shim must send them to the CPU
  device = f"cuda:{hparams.device}"
  ids = tok(requests[0]["prompt"], return_tensors="pt").to(device)["input_ids"]
  marker = torch.zeros(1, device=device) + torch.ones(1).cuda()
  model.cuda()
  with torch.no_grad():
    model(input_ids=ids)
  CALLS.append({"request": requests[0], "n_iter": hparams.n_iter, "device": str(marker.device),
                "copy": copy, "model": hparams.model_name, "eps": hparams.eps})
  return model, {}
'''

FAKE_HPARAMS = '''
import dataclasses
import yaml

@dataclasses.dataclass
class GraceHyperParams:
  alg_name: str
  model_name: str
  device: int
  inner_params: list
  edit_lr: float
  n_iter: int
  eps: float
  bf16: bool = False

  @classmethod
  def from_hparams(cls, path):
    with open(path) as f:
      return cls(**yaml.safe_load(f))
'''

FAKE_YAML = '''
alg_name: GRACE
model_name: ./hugging_cache/llama3-8b-instruct
device: 0
inner_params:
- model.layers[1].mlp.down_proj.weight
edit_lr: 1.0
n_iter: 7
eps: 1
bf16: true
'''


def _fake_checkout(root):
  files = {
      "src/__init__.py": "raise ImportError('the whole repository was imported')\n",
      "src/models/__init__.py": "raise ImportError('every editor was imported')\n",
      "src/util/__init__.py": "raise ImportError('src.util imported whole')\n",
      "src/util/calls.py": "CALLS = []\n",
      "src/models/grace/__init__.py": "",
      "src/models/grace/grace_main.py": FAKE_APPLY,
      "src/models/grace/grace_hparams.py": FAKE_HPARAMS,
      "hparams/GRACE/llama3-8b.yaml": FAKE_YAML,
  }
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(textwrap.dedent(text))
  return str(root)


@pytest.fixture
def fresh_import():
  """The harness imports the checkout as `horen_reference`: forget it after each test."""
  yield
  for name in [n for n in sys.modules if n == shim.PACKAGE or n.startswith(shim.PACKAGE + ".")]:
    del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  pytest.importorskip("torch")
  from conftest import build_tiny_hf
  folder = tmp_path_factory.mktemp("refbench-tiny")
  build_tiny_hf("llama", folder, vocab_size=2048, max_position_embeddings=128)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{WORLD}/{name}", folder / name)
  return str(folder)


def test_the_harness_drives_a_fake_reference_and_times_ours_beside_it(tmp_path, tiny_model,
                                                                     fresh_import):
  import torch
  originals = (torch.Tensor.to, torch.nn.Module.cuda, torch.zeros)
  code = _fake_checkout(tmp_path / "HoReN")
  records = load_records("checkpoints/world/data/zsre_test.json", limit=3)
  result = reference.per_edit_seconds("grace", tiny_model, records, code_dir=code, n_warm=1,
                                      steps={"n_iter": 2}, work=str(tmp_path / "work"))
  calls = shim.load(code, "util.calls").CALLS
  # one request per call, in order, as the reference's sequential runner builds them
  assert [c["request"]["prompt"] for c in calls] == [r.prompt for r in records]
  assert [c["request"]["target_new"] for c in calls] == [r.target for r in records]
  assert calls[0]["request"]["subject"] == records[0].extra["subject"]
  assert {c["copy"] for c in calls} == {False}
  # the file read as written, then the same reduced steps as ours, the model given, CPU tensors
  assert {c["n_iter"] for c in calls} == {2}
  assert {c["model"] for c in calls} == {tiny_model}
  assert {c["device"] for c in calls} == {"cpu"}
  assert {c["eps"] for c in calls} == {1.0}  # REFERENCE_FIXES: the float the reference needs
  # the shim is gone after the run
  assert (torch.Tensor.to, torch.nn.Module.cuda, torch.zeros) == originals
  assert result["edits"] == 2 and len(result["reference_times"]) == 2
  assert len(result["ours_times"]) == 2 and result["steps"] == {"n_iter": 2}
  assert result["ratio"] == pytest.approx(result["reference_s"] / result["ours_s"])
  assert all(t > 0 for t in result["reference_times"] + result["ours_times"])


def test_rows_without_a_checkout_say_what_they_need(monkeypatch):
  monkeypatch.delenv(reference.ENV, raising=False)
  rows = reference.rows({"records": []}, ["rome", "grace"], reference.code_dir(None))
  assert [r["benchmark"] for r in rows] == ["reference_rome", "reference_grace"]
  assert all("--reference-code" in r["skipped"] for r in rows)
  table = reference.markdown(rows)
  assert "| rome | - | - | - | needs --reference-code DIR" in table


def test_a_folder_that_is_not_a_checkout_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no src/models"):
    shim.check_checkout(str(tmp_path))
  rows = reference.rows({"records": []}, ["rome"], str(tmp_path))
  if "torch" in rows[0]["skipped"]:
    pytest.skip("torch is not installed")
  assert "not a checkout" in rows[0]["skipped"]


def test_the_reference_table_has_the_asked_columns():
  row = {"benchmark": "reference_rome", "method": "rome", "ours_ms": 12.0, "reference_ms": 240.0,
         "ratio": 20.0, "shape": "a model", "edits": 5, "steps": "as the hparams file",
         "load_average": 3.25}
  table = reference.markdown([row])
  assert table.splitlines()[0] == ("| method | ours ms/edit | reference ms/edit | ratio | shape | "
                                   "edits timed | steps | load average |")
  assert "| rome | 12.0 | 240.0 | 20.0x | a model | 5 | as the hparams file | 3.2 |" in table


def test_every_method_has_a_suite_entry_and_a_step_key():
  from benchmarks import suite
  assert set(suite.REFERENCE) == {f"reference_{m}" for m in harness.SPECS}
  assert set(suite.REFERENCE) <= set(suite.BENCHMARKS)
  assert set(harness.STEP_KEYS) <= set(harness.SPECS)
  # our copies of the reference's hparams files exist for the six methods
  for method in ("ultraedit", "alphaedit", "memit", "rome", "wise", "defer"):
    assert os.path.isfile(harness.hparams_paths(method, "/nowhere")[1])


def test_ours_reads_the_reference_file_less_only_the_keys_it_refuses(tmp_path):
  import yaml
  folder = tmp_path / "HoReN" / "hparams" / "HOREN"
  folder.mkdir(parents=True)
  (folder / "llama3-8b.yaml").write_text("alg_name: HOREN\nn_iter: 50\nlora_edit_lr: 0.001\n"
                                         "adapter_mode: value\n")
  path = harness.our_config("horen", str(tmp_path / "HoReN"), str(tmp_path / "work"))
  with open(path) as f:
    assert yaml.safe_load(f) == {"alg_name": "HOREN", "n_iter": 50, "adapter_mode": "value"}
  # a method without refused keys reads the file itself
  ours = harness.hparams_paths("rome", "")[1]
  assert harness.our_config("rome", "/nowhere", str(tmp_path)) == ours
