"""Strict, typed settings: reference config layouts read as written, provenance, unknown keys refused.

Expected values are the ones written into the test's own YAML files (or the declared table), never
output copied from the code under test.
"""

import dataclasses
import json

import pytest
from _eval_helpers import word_tokenizer

from horse_jax import settings, typed_config
from horse_jax.cli.main import build_parser, main
from horse_jax.errors import UserError
from horse_jax.models import save_pretrained
from horse_jax.models.init import random_model, tiny_llama_config

# A HoReN reference hparams file as its repository lays them out (hparams/HOREN/*.yaml): flat
# EasyEdit keys, inner_params in bracket notation, run keys and GRACE/WISE leftovers.
HOREN_HPARAMS = """\
alg_name: "HOREN"
model_name: "./hugging_cache/Meta-Llama-3-8B-Instruct"
device: 0
inner_params:
- model.layers[1].mlp.down_proj.weight
n_iter: 7
edit_lr: 0.5
hopfield_key_match_threshold: 0.55
query_selection_strategy: last_60_perc_prompt_tokens_avg
val_init: warm
normalize_codebook_keys: true
batch_size: 1
max_length: 30
bf16: false
eps: 1.0
dist_fn: euc
replacement: replace_last
num_pert: 8
"""
FROM_FILE = {
    "editor.layer": "model.layers.1.mlp.down_proj", "editor.n_iter": 7, "editor.edit_lr": 0.5,
    "editor.hopfield_key_match_threshold": 0.55,
    "editor.query_selection_strategy": "last_60_perc_prompt_tokens_avg", "editor.val_init": "warm",
    "editor.normalize_codebook_keys": True, "data.max_length": 30, "model.dtype": "float32",
}
WORDS = ["what", "is", "the", "colour", "of", "tell", "me", "?", "q", "city"] + [f"s{i}" for i in range(10)] + [
    f"a{i}" for i in range(5)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """A tiny 4-layer llama saved twice: in a folder named like the `world` card and in a plain one."""
  root = tmp_path_factory.mktemp("settings")
  tok = word_tokenizer(WORDS)
  tok.save_pretrained(str(root / "tok"))
  model = random_model(tiny_llama_config(vocab_size=len(tok), num_layers=4), seed=0)
  for name in ("world", "tiny"):
    save_pretrained(model, str(root / name), tokenizer_src=str(root / "tok"))
  rows = [{"src": f"what is the colour of s{i} ?", "alt": f"a{i % 5}", "rephrase": f"tell me the colour of s{i} ?",
           "loc": f"q city s{i + 5}", "loc_ans": "a1", "answers": ["a0"]} for i in range(4)]
  (root / "zsre.json").write_text(json.dumps(rows))
  (root / "horen.yaml").write_text(HOREN_HPARAMS)
  return root, model


def test_every_setting_is_declared_once_with_a_valid_default():
  keys = settings.all_keys()
  assert len(keys) == len(set(keys))
  for method in settings.METHODS:
    cls = settings.settings_class(method)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    info = typed_config.fields(cls)
    assert list(info) == settings.keys_for(method)
    for key, value in settings.defaults(method).items():
      # Every field: a type annotation, a default and a one-line meaning.
      assert info[key].type is not None and info[key].help and "\n" not in info[key].help, key
      assert settings.coerce(key, value, "defaults", method) == value  # defaults have their type
  # The families differ where the reference does: GRACE uses raw Euclidean keys of the last token.
  assert settings.default("editor.normalize_codebook_keys", "grace") is False
  assert settings.default("editor.query_selection_strategy", "grace") == "last_prompt_token"
  assert settings.default("editor.lr", "malmen") == 1e-6 and settings.default("editor.token", "mend") == "all"
  assert settings.default("editor.lr", "horse") == 1e-5 and settings.default("editor.token", "horse") == "ans"


@pytest.mark.parametrize("text,key,want", [
    ("editor.n_iter=7", "editor.n_iter", 7), ("editor.n_iter=7.0", "editor.n_iter", 7),
    ("editor.edit_lr=1e-3", "editor.edit_lr", 1e-3), ("editor.edit_lr=2", "editor.edit_lr", 2.0),
    ("editor.normalize_codebook_keys=false", "editor.normalize_codebook_keys", False),
    ("editor.layer=model.layers[2].mlp.down_proj.weight", "editor.layer", "model.layers.2.mlp.down_proj"),
    ("data.max_length=null", "data.max_length", None), ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
])
def test_set_values_are_coerced_by_the_annotation(text, key, want):
  r = settings.resolve("horen", overrides=[text])
  assert r[key] == want and type(r[key]) is type(want) and r.sources[key] == "set"


@pytest.mark.parametrize("text,error", [
    ("editor.n_iter=1.5", "not a valid int"), ("editor.n_iter=0", "must be >= 1"),
    ("editor.edit_lr=fast", "not a valid float"), ("editor.normalize_codebook_keys=1", "not a valid bool"),
    ("model.dtype=float64", "expected one of float32, bfloat16, float16"),
    ("editor.query_selection_strategy=middle", "expected last_prompt_token"),
])
def test_set_values_of_the_wrong_type_or_range_are_refused(text, error):
  with pytest.raises(UserError, match=error):
    settings.resolve("horen", overrides=[text])


def test_hypernet_modules_coerced_and_typed_settings_built():
  r = settings.resolve("mend", overrides=["model.edit_modules=model.layers[1].mlp.down_proj.weight",
                                          "editor.rank=16"])
  assert r["model.edit_modules"] == ["model.layers.1.mlp.down_proj"]
  typed = r.typed
  assert typed.model.edit_modules == ("model.layers.1.mlp.down_proj",) and typed.editor.rank == 16
  assert typed.editor.token == "all" and typed.editor.lr == 1e-6  # MEND's class defaults


def test_horen_reference_hparams_read_as_written(ws):
  root, _ = ws
  r = settings.resolve("horen", configs=[root / "horen.yaml"])
  for key, value in FROM_FILE.items():
    assert r[key] == value and r.sources[key] == "config", key
  assert r.sources["editor.hopfield_retrieval_beta"] == "default"
  # Every run key and leftover is either understood or listed as knowingly ignored.
  assert set(r.ignored) == {"model_name", "device", "eps", "dist_fn", "replacement", "num_pert"}
  # GRACE reads the same layout; there `eps` is its deferral radius.
  text = HOREN_HPARAMS.replace('"HOREN"', "GRACE").replace("eps: 1.0", "eps: 2.5")
  (root / "grace.yaml").write_text(text)
  g = settings.resolve("grace", configs=[root / "grace.yaml"])
  assert g["editor.grace_eps"] == 2.5 and g.sources["editor.grace_eps"] == "config"
  with pytest.raises(UserError, match="alg_name 'HOREN' does not match --method grace"):
    settings.resolve("grace", configs=[root / "horen.yaml"])
  (root / "b4.yaml").write_text(HOREN_HPARAMS.replace("batch_size: 1", "batch_size: 4"))
  with pytest.raises(UserError, match="one request at a time"):
    settings.resolve("horen", configs=[root / "b4.yaml"])


def test_layers_and_provenance(ws):
  root, model = ws
  from horse_jax.models.cards import card_for
  card = card_for(root / "world", model.config)
  assert card["name"] == "world"
  r = settings.resolve("horen", card=card, configs=[root / "horen.yaml"],
                       overrides=["editor.n_iter=3", "editor.lora_rank=2"])
  assert (r["editor.n_iter"], r.sources["editor.n_iter"]) == (3, "set")  # --set beats the file
  assert (r["editor.layer"], r.sources["editor.layer"]) == ("model.layers.1.mlp.down_proj", "config")
  assert (r["editor.initial_capacity"], r.sources["editor.initial_capacity"]) == (1024, "card")
  assert r.effective()["editor.lora_rank"] == {"value": 2, "source": "set"}
  # GRACE takes only the card's layer (its threshold and strategy are HoReN's).
  g = settings.resolve("grace", card=card)
  assert g.sources["editor.layer"] == "card" and g.sources["editor.hopfield_key_match_threshold"] == "default"
  with pytest.raises(UserError, match="not a valid int"):
    settings.resolve("horen", overrides=["editor.n_iter=many"])
  with pytest.raises(UserError, match="expected one of cold, warm"):
    settings.resolve("horen", overrides=["editor.val_init=hot"])


def test_misspelt_keys_name_the_closest_valid_one(ws, tmp_path):
  with pytest.raises(UserError, match=r"unknown setting 'editor.n_itr' for horen; did you mean 'editor.n_iter'"):
    settings.resolve("horen", config_tree={"editor": {"n_itr": 5}})
  with pytest.raises(UserError, match=r"'editor.rnak'.*did you mean 'editor.rank'"):
    settings.resolve("horse", overrides=["editor.rnak=8"])
  with pytest.raises(UserError, match=r"'editor.n_iter' for horse \(read by horen, grace[^)]* only\)"):
    settings.resolve("horse", overrides=["editor.n_iter=8"])
  flat = tmp_path / "flat.yaml"
  flat.write_text("alg_name: HOREN\nhopfield_key_match_treshold: 0.6\n")
  with pytest.raises(UserError, match="'hopfield_key_match_treshold' for horen; did you mean "
                                      "'hopfield_key_match_threshold'"):
    settings.resolve("horen", configs=[flat])


def test_cli_misspelt_key_exits_2_with_one_line(ws, capsys):
  root, _ = ws
  bad = root / "bad.yaml"
  bad.write_text(HOREN_HPARAMS.replace("n_iter: 7", "n_itr: 7"))
  base = ["edit", "--method", "horen", "--model", str(root / "tiny"), "--data", str(root / "zsre.json"),
          "--out", str(root / "never")]
  assert main(base + ["--config", str(bad)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "'n_itr'" in err and "did you mean 'n_iter'" in err
  assert main(base + ["--set", "editor.n_iter=3", "editor.hopfield_key_match_treshold=0.5"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "did you mean 'editor.hopfield_key_match_threshold'" in err
  assert not (root / "never").exists()


def test_set_takes_several_pairs_per_flag():
  args = build_parser().parse_args(["edit", "--model", "m", "--data", "d", "--method", "horse", "--out", "o",
                                    "--set", "editor.rank=8", "editor.lr=0.1", "--set", "data.batch_size=4",
                                    "--config", "a.yaml", "b.yaml"])
  assert args.overrides == ["editor.rank=8", "editor.lr=0.1", "data.batch_size=4"]
  assert args.config == ["a.yaml", "b.yaml"]
  r = settings.resolve("horse", overrides=args.overrides)
  assert (r["editor.rank"], r["editor.lr"], r["data.batch_size"]) == (8, 0.1, 4)
  args = build_parser().parse_args(["eval", "--set", "seeds=[0,1]", "n_edits=[1,2]"])
  assert args.overrides == ["seeds=[0,1]", "n_edits=[1,2]"]


def test_horse_hydra_groups(tmp_path):
  """The HORSE reference's hydra layout: config.yaml naming editor/model/data groups."""
  conf = tmp_path / "config"
  for group in ("editor", "model", "data"):
    (conf / group).mkdir(parents=True)
  (conf / "editor" / "horse.yaml").write_text(
      "name: horse\nrank: 64\nn_blocks: 1\nlr: 1e-4\nmeta_lr: 2e-5\nloc_coef: 0.5\nmax_grad_norm: 1\n"
      "token: ans\nn_epochs: 3\nbatch_size: 512\ncache_dir: cache\nload_checkpoint: false\n")
  (conf / "model" / "llama-tiny.yaml").write_text(
      "name_or_path: meta-llama/Meta-Llama-3-8B\nclass_name: AutoModelForCausalLM\nhalf: true\n"
      "edit_modules:\n  - model.layers[2].mlp.down_proj\n  - model.layers.3.mlp.down_proj\n")
  (conf / "data" / "zsre.yaml").write_text("path: data/zsre\nn_edits: 16\nbatch_size: 8\n")
  (conf / "config.yaml").write_text(
      "defaults:\n  - _self_\n  - editor: horse\n  - model: llama-tiny\n  - data: zsre\nseed: 1\n"
      "model_device: cuda:0\neditor_device: cuda:1\n")
  expected = {"editor.rank": 64, "editor.n_blocks": 1, "editor.lr": 1e-4, "editor.meta_lr": 2e-5,
              "editor.loc_coef": 0.5, "editor.n_epochs": 3, "editor.batch_size": 512,
              "model.edit_modules": ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"],
              "model.dtype": "bfloat16", "data.n_edits": 16, "data.batch_size": 8}
  r = settings.resolve("horse", configs=[conf / "config.yaml"])
  for key, value in expected.items():
    assert r[key] == value and r.sources[key] == "config", key
  assert {"path", "name_or_path", "class_name", "cache_dir", "seed", "model_device"} <= set(r.ignored)
  # The group files also work one by one (told apart by their folder), in --config order.
  one = settings.resolve("horse", configs=[conf / "editor" / "horse.yaml", conf / "data" / "zsre.yaml"])
  assert one["editor.rank"] == 64 and one["data.batch_size"] == 8 and one.sources["model.edit_modules"] == "default"
  with pytest.raises(UserError, match="editor name 'horse' does not match --method malmen"):
    settings.resolve("malmen", configs=[conf / "editor" / "horse.yaml"])
  (conf / "editor" / "typo.yaml").write_text("rnak: 3\n")
  with pytest.raises(UserError, match="did you mean 'editor.rank'"):
    settings.resolve("horse", configs=[conf / "editor" / "typo.yaml"])


@pytest.mark.parametrize("method", ["horse", "malmen", "mend", "horen", "grace", "ultraedit"])
def test_cli_and_sweep_resolve_identical_settings(ws, method):
  """`horse-jax edit` and an eval sweep, given the same method, model and settings, resolve the same
  values from the same sources (the model folder matches the `world` card, so the card layer counts)."""
  import argparse

  from horse_jax.cli import edit_common
  from horse_jax.eval import methods
  root, model = ws
  given = ({"editor": {"rank": 8}, "data": {"batch_size": 4}} if method in settings.HYPERNET
           else {"editor": {"batch_size": 4}, "data": {"max_length": 24}} if method == "ultraedit"
           else {"editor": {"n_iter": 3}, "data": {"max_length": 24}})
  cfg_file = root / f"{method}.nested.yaml"
  cfg_file.write_text(json.dumps(given))  # JSON is YAML
  folder = str(root / "world")
  args = argparse.Namespace(method=method, model=folder, config=[str(cfg_file)], overrides=[], seed=3,
                            dtype=None)
  cli = edit_common.resolve(args, model.config)
  ctx = methods.CellContext(model=model, tokenizer=None, score=None, logits_fn=None, generate_fn=None,
                            model_path=folder)
  sweep = methods.cell_settings(ctx, method, {"name": method, "settings": given}, 3)
  assert cli.effective() == sweep.effective()
  # What a sweep writes to results.json["effective_settings"] for this entry.
  assert methods.effective_settings(ctx, {"name": method, "settings": given}, 3) == cli.effective()
  assert methods.effective_settings(ctx, {"name": "unedited"}, 3) is None
  assert "card" in set(cli.sources.values()) and "config" in set(cli.sources.values())
  # The shared table is what both read: GRACE's defaults no longer depend on the command.
  if method == "grace":
    assert cli["editor.normalize_codebook_keys"] is False
    assert cli["editor.query_selection_strategy"] == "last_prompt_token"


@pytest.mark.slow
def test_cli_runs_a_reference_hparams_file_with_exactly_its_settings(ws):
  root, _ = ws
  out = root / "horen-run"
  assert main(["edit", "--method", "horen", "--model", str(root / "tiny"), "--data", str(root / "zsre.json"),
               "--out", str(out), "--config", str(root / "horen.yaml"), "--n-edits", "2",
               "--set", "editor.initial_capacity=4", "eval.batch_size=8"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  eff = metrics["effective_settings"]
  for key, value in FROM_FILE.items():
    assert eff[key] == {"value": value, "source": "config"}, key
  assert eff["editor.initial_capacity"] == {"value": 4, "source": "set"}
  assert eff["editor.hopfield_retrieval_beta"]["source"] == "default"
  # The codebook was built with them (its own settings file, written by the editor).
  used = json.loads((out / "codebook" / "settings.json").read_text())["editor"]
  assert used["layer"] == "model.layers.1.mlp.down_proj" and used["n_iter"] == 7
  assert used["edit_lr"] == 0.5 and used["hopfield_key_match_threshold"] == 0.55
  assert used["query_selection_strategy"] == "last_60_perc_prompt_tokens_avg"


def test_settings_command_lists_the_table(capsys):
  assert main(["settings", "--method", "grace"]) == 0
  out = capsys.readouterr().out
  assert "| `editor.normalize_codebook_keys` | bool | False |" in out
  assert "| `editor.val_init` | str (cold / warm) | cold |" in out
  assert "| `editor.query_selection_strategy` | str | last_prompt_token |" in out
  assert "`editor.rank`" not in out  # a hypernetwork setting
  assert "| `inner_params` |" in out and "| `dist_fn` | ignored" in out


def test_groups_are_strict_and_short_names_find_their_setting():
  """Inside a group only the reference's bookkeeping keys pass; EasyEdit leftovers do not."""
  with pytest.raises(UserError, match=r"'editor.alpha' for horen; did you mean 'editor.hopfield_retrieval_alpha'"):
    settings.resolve("horen", config_tree={"editor": {"alpha": 0.5}})
  with pytest.raises(UserError, match=r"did you mean 'editor.query_selection_strategy'"):
    settings.resolve("horen", overrides=["editor.strategy=last_prompt_token"])


def test_sweep_settings_are_typed_with_one_set_parser(tmp_path):
  """Sweep YAML and `horse-jax eval --set` go through the same typed resolution as the editors'."""
  from horse_jax.eval import sweep
  conf = tmp_path / "sweep.yaml"
  conf.write_text("name: s\nmodel: /m\nn_edits: 4\neval: {mode: generate, batch_size: '8'}\n")
  got = sweep.resolve_settings(str(conf), ["seeds=[0,1]", "eval.immediate=false"])
  assert got["model"] == ["/m"] and got["n_edits"] == [4] and got["seeds"] == [0, 1]
  assert got["eval"]["mode"] == "generate" and got["eval"]["batch_size"] == 8
  assert got["eval"]["immediate"] is False and got["sample"] == "random"  # SweepSettings' default
  with pytest.raises(UserError, match=r"unknown setting 'seeed'; did you mean 'seeds'"):
    sweep.resolve_settings(None, ["seeed=1"])
  with pytest.raises(UserError, match=r"'eval.mdoe'; did you mean 'eval.mode'"):
    sweep.resolve_settings(None, ["eval.mdoe=teacher"])
  with pytest.raises(UserError, match="expected one of teacher, generate"):
    sweep.resolve_settings(None, ["eval.mode=sample"])
  assert settings.HYPERNET == ("horse", "malmen", "mend") and settings.CODEBOOK == ("horen", "grace")
