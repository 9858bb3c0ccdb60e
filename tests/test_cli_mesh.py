"""`--mesh DATAxMODEL` on the CLI and `horse_jax.meshes` (8 forced CPU devices): same outputs as one
device; loading onto an explicit mesh; the FSDP decision and specs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from horse_jax import distributed, meshes
from horse_jax.cli.main import main
from horse_jax.errors import UserError
from horse_jax.models import from_pretrained, make_mesh, save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config
from horse_jax.models.sharding import fsdp_spec, spec_for, want_fsdp
from test_cli_train_edit import tiny_tokenizer, zsre_rows


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  root = tmp_path_factory.mktemp("mesh")
  tok, vocab = tiny_tokenizer()
  tok.save_pretrained(str(root / "tok"))
  # hidden 64 / MLP 128 / 4 heads: every rule's dimension divides 4 (model) and 2 (data).
  cfg = tiny_llama_config(vocab_size=vocab, num_layers=3)
  save_pretrained(random_model(cfg, seed=1), str(root / "llama"), tokenizer_src=str(root / "tok"))
  (root / "edits.json").write_text(json.dumps(zsre_rows(np.random.default_rng(1), 8)))
  return root


def _edit(ws, out, method, *extra):
  args = ["edit", "--model", str(ws / "llama"), "--data", str(ws / "edits.json"), "--method", method,
          "--out", str(out), "--set", "data.batch_size=4", *extra]
  if method == "horse":
    args += ["--hypernet", "init", "--set", "editor.rank=16", "--set", "editor.lr=1e-2",
             "--set", "model.edit_modules=[model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj]"]
  assert main(args) == 0


def _same_outputs(a, b):
  from safetensors.numpy import load_file
  da, db = load_file(str(a / "deltas.safetensors")), load_file(str(b / "deltas.safetensors"))
  assert sorted(da) == sorted(db)
  for name in da:
    assert np.abs(da[name]).max() > 0
    np.testing.assert_allclose(db[name], da[name], rtol=1e-4, atol=1e-4 * np.abs(da[name]).max())
  ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
  assert ma["summary"] == mb["summary"]
  assert ma["records"] == mb["records"]


def test_edit_with_mesh_equals_one_device(ws):
  _edit(ws, ws / "one", "horse")
  _edit(ws, ws / "mesh", "horse", "--mesh", "2x4")
  _same_outputs(ws / "one", ws / "mesh")
  # The edited checkpoint written from sharded params loads back equal to the one-device one.
  a, b = from_pretrained(str(ws / "one" / "model")), from_pretrained(str(ws / "mesh" / "model"))
  ka = np.asarray(a.params["model"]["layers"]["2"]["mlp"]["down_proj"]["kernel"])
  kb = np.asarray(b.params["model"]["layers"]["2"]["mlp"]["down_proj"]["kernel"])
  np.testing.assert_allclose(kb, ka, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_edit_with_fsdp_mesh_equals_one_device(ws):
  if not (ws / "one" / "deltas.safetensors").exists():
    _edit(ws, ws / "one", "horse")
  _edit(ws, ws / "fsdp", "horse", "--mesh", "2x4", "--fsdp")
  _same_outputs(ws / "one", ws / "fsdp")


def test_load_model_on_an_explicit_mesh(ws):
  from horse_jax.runtime import load_model
  model, _ = load_model(str(ws / "llama"), mesh=make_mesh(2, 4), fsdp=True)
  down = model.params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]  # [128, 64]
  assert down.sharding.spec == P("model", "data")
  assert down.addressable_shards[0].data.shape == (32, 32)
  norm = model.params["model"]["norm"]["scale"]
  assert norm.sharding.spec == P()
  one, _ = load_model(str(ws / "llama"))  # no mesh: one device, the same values
  np.testing.assert_array_equal(np.asarray(down), np.asarray(
      one.params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]))
  assert len(one.params["model"]["norm"]["scale"].devices()) == 1


def test_device_mesh_from_flags_and_card(ws):
  import jax
  assert meshes.device_mesh() == (None, False)  # one process, no --mesh: one device
  mesh, fsdp = meshes.device_mesh("2x4", "true")
  assert dict(mesh.shape) == {"data": 2, "model": 4} and fsdp is True
  mesh, fsdp = meshes.device_mesh("auto", None, str(ws / "llama"))  # no card: all on model
  assert dict(mesh.shape) == {"data": 1, "model": len(jax.devices())} and fsdp is False
  # auto FSDP needs to know a device's memory: the CPU reports none, so it stays off.
  assert meshes.device_mesh("2x4", "auto", str(ws / "llama"))[1] is False
  with pytest.raises(UserError):
    meshes.device_mesh("2x4", "sometimes")


def test_parse_mesh_and_auto():
  assert meshes.parse_mesh("2x4") == (2, 4)
  assert meshes.parse_mesh(" 1X8 ") == (1, 8)
  assert meshes.parse_mesh("auto") is None and meshes.parse_mesh(None) is None
  for bad in ("2x", "0x8", "two", "2x4x1"):
    with pytest.raises(UserError):
      meshes.parse_mesh(bad)
  card = {"name": "llama-3-8b", "sharding": {"mesh": {"data": 1, "model": 4}}}
  assert meshes.card_mesh(card, 8) == (1, 4)
  assert meshes.card_mesh(card, 2) == (1, 2)  # the card's mesh needs more devices than exist
  assert meshes.card_mesh({"name": "default", "sharding": {"mesh": {"data": 1, "model": 1}}}, 8) == (1, 8)
  assert dict(meshes.mesh_for("auto", None).shape) == {"data": 1, "model": 8}
  with pytest.raises(UserError):
    meshes.mesh_for("4x4")


def test_fsdp_spec_adds_data_to_the_largest_free_dim():
  mesh = make_mesh(2, 4)
  assert fsdp_spec(P(None, "model"), (4096, 14336), mesh) == P("data", "model")
  assert fsdp_spec(P("model"), (14336, 4096), mesh) == P("model", "data")
  assert fsdp_spec(P(), (128256, 4096), mesh) == P("data")
  assert fsdp_spec(P(), (4096,), mesh) == P()                    # vectors stay replicated
  assert fsdp_spec(P(None, "model"), (3, 8), mesh) == P(None, "model")  # 3 % 2 != 0
  assert fsdp_spec(P(), (6, 10), mesh) == P(None, "data")        # largest divisible dim
  assert fsdp_spec(P(None, "model"), (64, 64), make_mesh(1, 8)) == P(None, "model")  # data = 1
  assert spec_for("model.layers.0.mlp.down_proj.kernel", (128, 64), mesh, fsdp=True) == P("model", "data")
  # auto: on only when one tensor-parallel replica takes over half a device.
  import jax
  params = {"model": {"layers": {"0": {"mlp": {"down_proj": {"kernel": jax.ShapeDtypeStruct((1024, 512), np.float32)}}}}}}
  per_device = 1024 * 512 * 4 // 4
  assert want_fsdp("auto", params, mesh, 2 * per_device - 8)
  assert not want_fsdp("auto", params, mesh, 2 * per_device + 8)
  assert not want_fsdp("auto", params, mesh, None)
  assert want_fsdp("true", params, mesh, None) and not want_fsdp(False, params, mesh, None)
  with pytest.raises(UserError):
    want_fsdp("sometimes", params, mesh, None)


def test_global_array_and_to_host_round_trip():
  import jax
  from jax.sharding import NamedSharding
  mesh = make_mesh(2, 4)
  x = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
  g = distributed.global_array(x, NamedSharding(mesh, P("data", "model")))
  assert g.sharding.spec == P("data", "model") and g.addressable_shards[0].data.shape == (4, 3)
  np.testing.assert_array_equal(distributed.to_host(g), x)
  tree = distributed.tree_to_host({"a": g, "b": jax.numpy.ones(3)})
  assert isinstance(tree["a"], np.ndarray) and tree["b"].tolist() == [1.0, 1.0, 1.0]
  assert distributed.is_main() and not distributed.initialize()  # nothing to join in one process
  with pytest.raises(UserError):
    distributed.initialize(coordinator="127.0.0.1:1", num_processes=None, process_id=0)


def test_auto_fsdp_follows_the_weights_size_against_device_memory(ws, monkeypatch):
  import jax
  from horse_jax.runtime import load_model
  model, _ = load_model(str(ws / "llama"))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(model.params))
  path = str(ws / "llama")
  # One tensor-parallel replica holds at most all the weights: a device of twice that stays whole.
  monkeypatch.setattr(meshes, "device_memory_bytes", lambda: 2 * total)
  assert meshes.device_mesh("2x4", "auto", path)[1] is False
  monkeypatch.setattr(meshes, "device_memory_bytes", lambda: 1024)  # far smaller: split
  assert meshes.device_mesh("2x4", "auto", path)[1] is True
  assert meshes.device_mesh("2x4", None, path)[1] is True  # no card: auto
  assert meshes.device_mesh("1x8", "auto", path)[1] is False  # nothing to split over



ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "checkpoints", "world")
# Scores the first N records of the demo world in a fresh process with 8 CPU devices: one JSON line.
SCORE_ON_MESH = r"""
import json, sys
from horse_jax.data.loaders import load_records
from horse_jax.eval.scoring import score_records
from horse_jax.meshes import mesh_for
from horse_jax.runtime import load_model, logits_fn
model, tok = load_model(sys.argv[1], mesh=mesh_for(sys.argv[3]))
scores = score_records(load_records(sys.argv[2], limit=int(sys.argv[4])), tok, logits_fn(model),
                       logits_fn(model), progress=False)
print(json.dumps(scores["records"]))
"""


@pytest.fixture(scope="module")
def world_scores_one_device():
  from horse_jax.data.loaders import load_records
  from horse_jax.eval.scoring import score_records
  from horse_jax.runtime import load_model, logits_fn
  model, tok = load_model(os.path.join(WORLD, "model"))
  records = load_records(os.path.join(WORLD, "data", "zsre_test.json"), limit=1000)
  return json.loads(json.dumps(score_records(records, tok, logits_fn(model), logits_fn(model),
                                             progress=False)["records"]))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_scoring_many_batches_on_a_mesh_equals_one_device(world_scores_one_device, mesh):
  # 1,000 records: about 50 scoring batches of 64 pairs, three sharded programs each. Dispatched
  # without a bound (before horse_jax.inflight), XLA's CPU client deadlocked in a collective and
  # aborted the process after 40 s; the edit tests above score one batch and never see it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  run = subprocess.run([sys.executable, "-c", SCORE_ON_MESH, os.path.join(WORLD, "model"),
                        os.path.join(WORLD, "data", "zsre_test.json"), mesh, "1000"],
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  sharded = json.loads(run.stdout.strip().splitlines()[-1])
  assert len(sharded) == 1000 and sharded == world_scores_one_device
