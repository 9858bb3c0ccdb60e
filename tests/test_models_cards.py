"""Model cards: every shipped card is valid for its architecture; lookup and fallbacks."""

import dataclasses
import json

import pytest

from horse_jax import settings
from horse_jax.errors import UserError
from horse_jax.models.cards import CARDS_DIR, card_for, load_cards
from horse_jax.models.init import tiny_llama_config
from horse_jax.models.names import module_names

EXPECTED = {"llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-7b", "gpt-j-6b", "qwen2.5-7b",
            "deepseek-r1-distill-qwen-7b", "world",
            # Every model the HoReN reference evaluates (its hparams/HOREN files).
            "llama-3-8b-instruct", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct",
            "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-llama-8b",
            "qwen-sea-lion-v4-32b-it"}


def _config_like(card):
  """A small config with the card's architecture and depth (sizes do not matter for names)."""
  return tiny_llama_config(model_type=card["model_type"], num_layers=card["num_layers"],
                           hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=2,
                           head_dim=8)


def test_all_cards_present_and_valid():
  cards = load_cards()
  assert EXPECTED <= set(cards)
  for name, card in cards.items():
    known = set(module_names(_config_like(card)))
    assert card["edit_modules"], name
    assert all(m in known for m in card["edit_modules"]), name
    horen = card["horen"]["editor"]
    assert horen["layer"] in known, name
    # Reference range for real models; the toy world card is tuned on its own edits (README horen).
    assert 0.55 <= horen["hopfield_key_match_threshold"] <= (0.99 if name == "world" else 0.85), name
    # Every card value is a setting HoReN reads, of its declared type.
    resolved = settings.resolve("horen", card=card)
    for key, value in horen.items():
      assert resolved.sources[f"editor.{key}"] == "card" and resolved[f"editor.{key}"] == value, (name, key)
    assert card["dtype"] in ("float32", "bfloat16"), name
    assert set(card["sharding"]["mesh"]) == {"data", "model"}, name


def test_reference_modules():
  cards = load_cards()
  assert cards["llama-3-8b"]["edit_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(26, 32)]
  assert cards["gpt-j-6b"]["edit_modules"] == [f"transformer.h.{i}.mlp.fc_out" for i in range(22, 28)]
  assert cards["qwen2.5-7b"]["edit_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(22, 28)]
  assert cards["llama-3-8b"]["horen"]["editor"]["layer"] == "model.layers.29.mlp.down_proj"
  assert cards["qwen2.5-7b"]["horen"]["editor"]["layer"] == "model.layers.24.mlp.down_proj"


def test_horen_reference_settings():
  """Layer / threshold / query / dtype that the HoReN reference's hparams files use."""
  cards = load_cards()
  for name in ("llama-3-8b-instruct", "llama-3.1-8b-instruct"):
    assert cards[name]["model_type"] == "llama" and cards[name]["num_layers"] == 32
    assert cards[name]["horen"]["editor"]["layer"] == "model.layers.29.mlp.down_proj"
    assert cards[name]["horen"]["editor"]["hopfield_key_match_threshold"] == 0.85
  assert cards["qwen2.5-7b-instruct"]["horen"]["editor"]["layer"] == "model.layers.24.mlp.down_proj"
  assert cards["deepseek-r1-distill-llama-8b"]["model_type"] == "llama"
  assert cards["deepseek-r1-distill-qwen-1.5b"]["model_type"] == "qwen2"
  lion = cards["qwen-sea-lion-v4-32b-it"]
  assert lion["model_type"] == "qwen3" and lion["dtype"] == "bfloat16"
  assert lion["horen"] == {"editor": {"layer": "model.layers.56.mlp.down_proj",
                                      "hopfield_key_match_threshold": 0.55,
                                      "query_selection_strategy": "last_60_perc_prompt_tokens_avg"}}


def test_instruct_models_find_their_own_card():
  for folder, name in [("/ckpt/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
                       ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b-instruct"),
                       ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
                       ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
                       ("aisingapore/Qwen-SEA-LION-v4-32B-IT", "qwen-sea-lion-v4-32b-it")]:
    card = load_cards()[name]
    assert card_for(folder, _config_like(card))["name"] == name, folder


def test_lookup_by_folder_name_hf_id_and_card_name():
  cfg = _config_like(load_cards()["llama-3-8b"])
  assert card_for("/data/ckpt/Meta-Llama-3-8B", cfg)["name"] == "llama-3-8b"
  assert card_for("meta-llama/Meta-Llama-3-8B", cfg)["name"] == "llama-3-8b"
  assert card_for("qwen2.5-7b")["name"] == "qwen2.5-7b"  # no config: explicit name only
  gptj = _config_like(load_cards()["gpt-j-6b"])
  assert card_for("/models/gpt-j-6B", gptj)["horen"]["editor"]["layer"].startswith("transformer.h.")


def test_lookup_by_name_or_path_in_config():
  cfg = _config_like(load_cards()["qwen2.5-7b"])
  cfg = dataclasses.replace(cfg, hf_config_json=json.dumps({"_name_or_path": "Qwen/Qwen2.5-7B"}))
  assert card_for("/tmp/anything", cfg)["name"] == "qwen2.5-7b"


def test_world_path_matches_world_card():
  cfg = _config_like(load_cards()["world"])
  assert card_for("checkpoints/world/model", cfg)["name"] == "world"


def test_card_that_does_not_fit_the_model_falls_back_to_defaults():
  tiny = tiny_llama_config(num_layers=3)
  card = card_for("/tmp/llama-3-8b", tiny)  # a tiny model in a misleadingly named folder
  assert card["name"] == "default"
  assert card["edit_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
  assert card["horen"] == {"editor": {"layer": "model.layers.2.mlp.down_proj"}}


def test_unknown_model_defaults_and_missing_cards_folder(tmp_path):
  cfg = tiny_llama_config(num_layers=8)
  card = card_for("/tmp/my-model", cfg)
  assert card["name"] == "default"
  assert card["edit_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2, 8)]
  assert card_for("llama-3-8b", cfg, cards_dir=tmp_path / "none")["name"] == "default"
  with pytest.raises(UserError, match="no model card"):
    card_for("/tmp/my-model")


def test_returned_card_is_a_copy():
  card = card_for("llama-3-8b")
  card["edit_modules"].clear()
  assert card_for("llama-3-8b")["edit_modules"]


def test_cards_live_in_the_repository_models_folder():
  assert CARDS_DIR.name == "models" and (CARDS_DIR / "llama-3-8b.yaml").is_file()


def test_card_values_override_defaults_with_provenance_card():
  """A card's value beats the settings class's default and says so; GRACE wraps HoReN's layer only."""
  card = load_cards()["llama-3-8b-instruct"]
  horen = settings.resolve("horen", card=card)
  assert horen["editor.hopfield_key_match_threshold"] == 0.85 != settings.default(
      "editor.hopfield_key_match_threshold", "horen")
  assert horen.sources["editor.hopfield_key_match_threshold"] == "card"
  assert horen.sources["editor.n_iter"] == "default"
  assert horen.typed.editor.hopfield_key_match_threshold == 0.85
  grace = settings.resolve("grace", card=card)
  assert grace["editor.layer"] == "model.layers.29.mlp.down_proj" and grace.sources["editor.layer"] == "card"
  assert grace.sources["editor.hopfield_key_match_threshold"] == "default"
  malmen = settings.resolve("malmen", card=card)
  assert malmen["model.edit_modules"] == card["edit_modules"] and malmen.sources["model.dtype"] == "card"


def test_a_card_with_the_old_names_is_refused_naming_the_new_one():
  card = {"name": "old", "card_file": "old.yaml", "horen": {"editor": {"threshold": 0.8}}}
  with pytest.raises(UserError, match="did you mean 'editor.hopfield_key_match_threshold'"):
    settings.resolve("horen", card=card)


def test_cards_do_not_import_settings():
  """One direction only: settings read cards; cards know no settings (no import cycle)."""
  import ast
  import inspect

  from horse_jax.models import cards
  tree = ast.parse(inspect.getsource(cards))
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
      a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert not any(m and (m == "horse_jax.settings" or m.startswith("horse_jax.editors")) for m in imported)
  assert not any(a.name == "settings" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 for a in n.names)
