"""`horse-jax plan`: per-device numbers from compiled stages, with a config.json and no weights."""

import json
import os

import numpy as np
import pytest

from horse_jax.cli.main import main
from horse_jax.models import config_to_hf, make_mesh
from horse_jax.models.init import tiny_llama_config
from horse_jax import plan as plan_lib
from horse_jax.collectives import KINDS

# hidden 64, MLP 128, 4 heads of 16 (2 kv heads), vocab 128, 2 layers: every matrix dimension is a
# multiple of 8, so every matrix splits over any mesh axis of the 8 test devices.
H, I, V, L, KV = 64, 128, 128, 2, 32


def _config_folder(tmp_path):
  folder = tmp_path / "tiny-llama"
  folder.mkdir()
  cfg = tiny_llama_config(num_layers=L, vocab_size=V)
  (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
  return folder


def _bytes_by_hand(split_matrices: int, itemsize: int = 4) -> int:
  """Per-device param bytes: every matrix split `split_matrices` ways, vectors (norms) replicated."""
  per_layer = H * H + H * KV + H * KV + H * H + 3 * H * I
  matrices = L * per_layer + 2 * V * H
  vectors = L * 2 * H + H
  return (matrices // split_matrices + vectors) * itemsize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _config_folder(tmp_path_factory.mktemp("plan"))


@pytest.mark.parametrize("shape,fsdp,split", [((1, 8), False, 8), ((2, 4), False, 4), ((2, 4), True, 8),
                                              ((1, 1), False, 1)])
def test_load_stage_counts_the_shards_a_device_holds(folder, shape, fsdp, split):
  from horse_jax.models import Model, read_config
  from horse_jax.models import sharding
  mesh = make_mesh(*shape)
  params = plan_lib.abstract_params(read_config(str(folder)), "float32")
  params = plan_lib._with_sharding(params, sharding.param_shardings(params, mesh, fsdp))
  stage = plan_lib.load_stage(Model(params, read_config(str(folder))))
  assert stage.weights == _bytes_by_hand(split)
  bf16 = plan_lib.abstract_params(read_config(str(folder)), "bfloat16")
  assert plan_lib._shard_bytes(plan_lib._with_sharding(bf16, sharding.param_shardings(bf16, mesh, fsdp))) \
      == _bytes_by_hand(split, 2)


@pytest.mark.slow  # ~20 s: compiles the whole edit and meta-training programs
def test_plan_horse_json(folder, capsys):
  rc = main(["plan", "--model", str(folder), "--method", "horse", "--n-edits", "40", "--mesh", "2x4",
             "--set", "editor.rank=16", "--set", "data.batch_size=8", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  stages = {s["name"]: s for s in out["stages"]}
  assert out["mesh"] == {"data": 2, "model": 4} and out["dtype"] == "float32"
  assert stages["load"]["weights"] == _bytes_by_hand(4)
  assert out["peak_bytes_per_device"] == max(s["peak"] for s in out["stages"])
  for s in out["stages"]:
    assert s["peak"] == s["arguments"] + s["outputs"] + s["temporaries"] - s["aliased"] + s["resident"]
  compiled = [s for s in out["stages"] if s["name"] != "load"]
  assert len(compiled) >= 2 and all(s["flops"] > 0 and s["arguments"] > 0 for s in compiled)
  assert out["fits"] == {c: True for c, _ in plan_lib.CHIPS}
  assert out["info"]["modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
  # Rows of K split over `data` (2): the ridge gram K^T K [I, I] is all-reduced in the edit.
  assert all(s["collective_bytes"] >= I * I * 4 for s in compiled if s["name"] != "memo-fill")


def test_plan_horen_codebook_and_table(folder, capsys):
  n = 4000
  assert main(["plan", "--model", str(folder), "--method", "horen", "--n-edits", str(n),
               "--mesh", "1x8", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in out["stages"]] == ["load", "edit", "inference"]
  assert out["info"]["codebook_rows"] == 4096  # 64 doubled until it holds n + 1 rows
  # Keys [rows, 128] and values [rows, 64] float32 (plus labels, radius) are arguments of the edit.
  edit = out["stages"][1]
  # Keys and values split by row over all 8 devices: each holds an eighth of each, never all keys.
  rows_share = (4096 * I * 4 + 4096 * H * 4) // 8
  assert _bytes_by_hand(8) + rows_share <= edit["arguments"] < _bytes_by_hand(8) + 4096 * I * 4
  assert edit["flops"] > 0
  # Collectives of the compiled program (per device): the largest is one of them, all are counted.
  big = edit["largest_collective"]
  assert edit["collective_ops"] >= 1 and big["kind"] in KINDS
  assert edit["collective_bytes"] >= big["bytes"] * big["count"] > 0
  # The test's devices are CPU devices: XLA:CPU stands in for the target, and says so.
  assert out["compiler"]["stand_in"] and out["compiler"]["compiler"] == "XLA:CPU"
  assert out["token_shapes"]["seq_len"] == 32 and out["token_shapes"]["seq_len_from"] == "default"
  text = plan_lib.markdown(out)
  assert "| edit |" in text and "fits: TPU v5e" in text
  assert "compiled by XLA:CPU on 8 forced CPU devices standing in for" in text
  assert f"| {big['kind']} " in text and "token shapes: 32 tokens per edit (default)" in text
  # Inference reads the same row-split codebook: an eighth of its keys per device, logits
  # [eval.batch_size, 32, vocab] float32 as the output, and no collective of the keys' size.
  inf = out["stages"][2]
  n_eval = out["info"]["eval_batch_size"]
  assert _bytes_by_hand(8) + rows_share <= inf["arguments"] < _bytes_by_hand(8) + 4096 * I * 4
  assert inf["outputs"] >= n_eval * 32 * V * 4 // 8
  # What crosses devices is activation-sized (the LM's tensor-parallel all-reduces of [batch,
  # tokens, hidden]), never a gather of the codebook's 4,096 rows.
  big_inf = inf["largest_collective"]
  assert "4096" not in big_inf["shape"] and big_inf["bytes"] <= 2 * n_eval * 32 * H * 4, big_inf
  assert "| inference |" in text


WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "world")


def test_plan_token_shapes_from_data(folder, capsys):
  """--data: the longest tokenized (prompt + target) pair and the mean answer tokens (rounded up) of
  the first --n-edits records, with the model's tokenizer; a flag given too wins and is named."""
  from horse_jax.data.loaders import load_records
  from horse_jax.models import load_tokenizer
  data, tok_dir = os.path.join(WORLD, "data", "zsre_test.json"), os.path.join(WORLD, "model")
  n = 20
  tok = load_tokenizer(tok_dir)
  records = load_records(data, limit=n)
  lengths = [len(tok(r.prompt)["input_ids"]) + len(tok(" " + r.target, add_special_tokens=False)["input_ids"]) - 1
             for r in records]
  answers = [len(tok(" " + r.target, add_special_tokens=False)["input_ids"]) for r in records]
  args = ["plan", "--model", str(folder), "--method", "grace", "--n-edits", str(n), "--mesh", "1x1",
          "--data", data, "--tokenizer", tok_dir, "--json"]
  assert main(args) == 0
  shapes = json.loads(capsys.readouterr().out)["token_shapes"]
  assert shapes["seq_len"] == max(lengths) and shapes["seq_len_from"] == "--data"
  assert shapes["answer_tokens"] == int(np.ceil(np.mean(answers))) and shapes["data"]["records"] == n
  assert main(args[:-1] + ["--seq-len", "16"]) == 0
  text = capsys.readouterr().out
  assert "token shapes: 16 tokens per edit (--seq-len)" in text
  assert f"answer tokens per edit (mean {np.mean(answers):.2f} of {n} records of {data}" in text
  # No tokenizer in the model folder, or --tokenizer without --data: one line, exit 2.
  assert main(args[:-3] + ["--json"]) == 2
  assert "--data needs the model's tokenizer" in capsys.readouterr().err
  assert main(args[:9] + ["--tokenizer", tok_dir]) == 2


def test_plan_errors(folder):
  assert main(["plan", "--model", str(folder / "missing"), "--method", "horse", "--n-edits", "1"]) == 2
  assert main(["plan", "--model", str(folder), "--method", "horse", "--n-edits", "1", "--mesh", "4x4"]) == 2
  assert main(["plan", "--model", str(folder), "--method", "horse", "--n-edits", "0"]) == 2


def test_plan_hypernet_stages_are_the_programs(folder, capsys, monkeypatch):
  """The plan's hypernetwork stages are exactly the programs `edit` and `train` run (the memo's
  programs when `editor.memo_cache_mb` holds a step's rows); a program that cannot be lowered fails
  the plan with one line naming it (no fallback to other functions)."""
  import jax
  from horse_jax.editors.hypernet import program
  lowered = []
  real_compile = plan_lib._compile

  def spy(fn, *args, **kwargs):
    lowered.append(fn)
    return real_compile(fn, *args, **kwargs)

  monkeypatch.setattr(plan_lib, "_compile", spy)
  args = ["plan", "--model", str(folder), "--method", "mend", "--n-edits", "8", "--mesh", "1x1",
          "--set", "editor.rank=8", "--json"]
  assert main(args) == 0
  out = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in out["stages"]] == ["load", "edit", "meta-step", "memo-fill", "meta-step-memo"]
  assert lowered == [program.edit_program, program.train_program, program.fill_memo_program,
                     program.train_program_memo]
  # the largest memo of 1024 MiB (the default budget): float32 keys [., I] + value grads [., H]
  row_bytes = 4 * len(out["info"]["modules"]) * (I + H)
  assert out["info"]["memo_rows"] == 1024 * 2 ** 20 // row_bytes - 1
  assert set(out["peaks"]) == {"edit", "meta-training step"} and "programs" not in out["info"]
  assert out["peaks"]["meta-training step"] == max(s["peak"] for s in out["stages"][2:])

  lowered.clear()
  assert main(args + ["--set", "editor.memo_cache_mb=0"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in out["stages"]] == ["load", "edit", "meta-step"]
  assert lowered == [program.edit_program, program.train_program]

  @jax.jit
  def train_program(state, model, edits, rephrase, loc):  # a program of another signature
    return state

  monkeypatch.setattr(program, "train_program", train_program)
  assert main(args) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and "train_program" in lines[0], lines


def _llama3_8b_plan(method, n, capsys):
  assert main(["plan", "--model", "llama-3-8b", "--method", method, "--n-edits", str(n),
               "--mesh", "1x8", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["dtype"] == "bfloat16"
  # bf16 weights over 8 devices: every matrix of Llama-3-8B splits 8 ways, norms are replicated.
  matrices = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 2 * 128256 * 4096
  vectors = 32 * 2 * 4096 + 4096
  assert out["stages"][0]["weights"] == (matrices // 8 + vectors) * 2
  return out


@pytest.mark.slow
def test_llama3_8b_horen_50k_fits_16gib_per_device_on_1x8(capsys):
  """Issue 11: HoReN with a 50,000-entry codebook on Llama-3-8B (bf16) fits a TPU v5e chip."""
  out = _llama3_8b_plan("horen", 50000, capsys)
  assert out["info"]["codebook_rows"] >= 50001
  assert out["fits"]["TPU v5e"], out["peak_bytes_per_device"] / 2 ** 30


@pytest.mark.slow
def test_llama3_8b_horse_8000_fits_16gib_per_device_on_1x8(capsys):
  """Issue 11: HORSE with 8,000 edits (rank 1920, the card's 6 modules): edit and meta-step fit.

  The programs run the LM chunk by chunk, split the cached rows over `model`, and solve the modules
  one at a time (`lax.scan` over the stacked modules: one [14336, 14336] ridge factor alive at a
  time, the others kept split over `model`); without that the meta-step needed ~19 GiB.
  """
  out = _llama3_8b_plan("horse", 8000, capsys)
  assert out["info"]["rank"] == 1920 and len(out["info"]["modules"]) == 6
  peak = {s["name"]: s["peak"] / 2 ** 30 for s in out["stages"]}
  assert peak["edit"] <= 16 and peak["meta-step"] <= 16, peak
  assert out["peak_stage"] == "meta-step"
  assert out["fits"]["TPU v5e"], out["peak_bytes_per_device"] / 2 ** 30


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
def test_plan_locate_statistics_target_and_solve(folder, capsys, method):
  """ROME / MEMIT / AlphaEdit: the statistics batch, one request's target optimisation and one
  module's closed form, with the run's C, shifts (AlphaEdit: P and cache) resident, by hand."""
  layers = "[1]" if method == "rome" else "[0,1]"
  assert main(["plan", "--model", str(folder), "--method", method, "--n-edits", "10", "--mesh", "1x8",
               "--set", f"editor.layers={layers}", "--set", "editor.v_loss_layer=1", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  stages = {s["name"]: s for s in out["stages"]}
  assert list(stages) == ["load", "statistics", "target", "solve"]
  n_mod = 1 if method == "rome" else 2
  cov = I * I * 4  # C of a down_proj: its input is the MLP's [I]
  # The sums of one batch (at least an eighth of every module's [I, I] per device) and the running
  # sums beside them, laid out alike.
  assert stages["statistics"]["outputs"] >= n_mod * cov // 8
  assert stages["statistics"]["resident"] == stages["statistics"]["outputs"]
  per_module = cov * (1 + 2 * (method == "alphaedit")) + I * H * 4  # C (+ P, cache) and the shift
  assert stages["target"]["resident"] == n_mod * per_module
  assert stages["solve"]["arguments"] >= cov * (2 if method == "alphaedit" else 1)
  assert stages["target"]["flops"] > 0 and out["info"]["modules"] == [
      f"model.layers.{i}.mlp.down_proj" for i in ([1] if method == "rome" else [0, 1])]
  if method == "rome":  # without C, no statistics and nothing but the shift resident
    assert main(["plan", "--model", str(folder), "--method", "rome", "--n-edits", "1", "--set",
                 "editor.layers=[1]", "--set", "editor.mom2_adjustment=false", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["stages"]] == ["load", "target", "solve"]
    assert out["stages"][1]["resident"] == I * H * 4
