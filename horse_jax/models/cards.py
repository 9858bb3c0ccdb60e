"""Model cards: per-checkpoint settings (edit modules, HoReN settings, dtype, mesh).

Cards are the YAML files in the repository's top-level `models/` folder, installed with the package
as `horse_jax.cards` (pyproject maps that package to `models/`), so a wheel and a clone find them the
same way: through the import system (`cards_dir`). `card_for` finds the card
of a checkpoint by, in order: an explicit card name; the folder name (or a `.../world/model` path);
the config's `_name_or_path`; matching is on names with case and punctuation ignored, against each
card's `name`, `hf_id` (and its last part) and `aliases`. A card whose model_type or layer count
contradicts the actual config is not used. Without a card the defaults are derived from the config.

A card's editor settings use the reference names: `edit_modules` (HORSE/MALMEN/MEND's
`model.edit_modules`) and a section per codebook method read like a nested `--config` file, e.g.
`horen: {editor: {layer: ..., hopfield_key_match_threshold: 0.85, query_selection_strategy: ...}}`
(GRACE wraps the same `editor.layer`); `horse_jax.settings.card_values` reads them. This module only
finds cards: it imports no settings.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import yaml

from horse_jax.errors import UserError
from horse_jax.models.config import ModelConfig
from horse_jax.models.names import default_codebook_module, default_edit_modules, module_names



def cards_dir() -> Path:
  """The folder of the cards: the installed package `horse_jax.cards` (a wheel, or an editable
  install made with this pyproject), else the `models/` folder next to the source tree (a clone run
  without installing, or an editable install made before the mapping existed)."""
  try:
    spec = importlib.util.find_spec("horse_jax.cards")
  except ModuleNotFoundError:
    spec = None
  for location in (spec.submodule_search_locations or []) if spec else []:
    if Path(location).is_dir():
      return Path(location)
  return Path(__file__).resolve().parents[2] / "models"


CARDS_DIR = cards_dir()


def _key(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.lru_cache(maxsize=None)
def load_cards(folder: str = str(CARDS_DIR)) -> dict[str, dict[str, Any]]:
  """All cards by name ({} when the folder is missing)."""
  cards = {}
  root = Path(folder)
  if not root.is_dir():
    return cards
  for file in sorted(root.glob("*.yaml")):
    try:
      card = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
      raise UserError(f"{file}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(card, dict) or "name" not in card:
      raise UserError(f"{file}: a model card must be a mapping with a 'name'")
    card["card_file"] = str(file)
    cards[str(card["name"])] = card
  return cards


def _card_keys(card: dict[str, Any]) -> set[str]:
  names = [str(card["name"])] + [str(a) for a in card.get("aliases") or []]
  if card.get("hf_id"):
    names += [str(card["hf_id"]), str(card["hf_id"]).rsplit("/", 1)[-1]]
  return {_key(n) for n in names}


def default_card(config: ModelConfig) -> dict[str, Any]:
  """Settings derived from the config alone: last 6 edit modules (MLP down-projections), HoReN at
  ~0.9 depth (the architecture's codebook module); the other settings keep their defaults."""
  mods = default_edit_modules(config)
  horen_layer = min(int(round(0.9 * config.num_layers)), config.num_layers - 1)
  horen_module = default_codebook_module(config, horen_layer)  # the architecture's choice
  return {
      "name": "default",
      "model_type": config.model_type,
      "num_layers": config.num_layers,
      "dtype": "float32",
      "edit_modules": mods,
      "horen": {"editor": {"layer": horen_module}},
      "sharding": {"mesh": {"data": 1, "model": 1}},
  }


def codebook_layer(card: dict[str, Any]) -> str | None:
  """The module HoReN / GRACE wrap on the card's model (`horen.editor.layer`), or None."""
  return ((card.get("horen") or {}).get("editor") or {}).get("layer")


def _fits(card: dict[str, Any], config: ModelConfig | None) -> bool:
  if config is None:
    return True
  if card.get("model_type") not in (None, config.model_type):
    return False
  if card.get("num_layers") not in (None, config.num_layers):
    return False
  known = set(module_names(config))
  wanted = list(card.get("edit_modules") or []) + [codebook_layer(card)]
  return all(m is None or m in known for m in wanted)


def _candidates(path_or_name: str | os.PathLike | None, config: ModelConfig | None) -> list[str]:
  out = []
  if path_or_name:
    text = os.fspath(path_or_name).rstrip("/\\")
    out.append(text)
    parts = Path(text).parts
    if len(parts) >= 2 and parts[-2:] == ("world", "model"):
      out.append("world")
    out.append(Path(text).name)
  if config is not None:
    name_or_path = config.hf_config.get("_name_or_path")
    if name_or_path:
      out += [str(name_or_path), Path(str(name_or_path)).name]
  return out


def card_for(path_or_name: str | os.PathLike | None, config: ModelConfig | None = None,
             cards_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """The model card of a checkpoint (a fresh dict; safe to modify).

  Args:
    path_or_name: checkpoint folder, HF id, or card name (e.g. "llama-3-8b").
    config: the loaded model's config: used for `_name_or_path`, to reject a card that does not
      fit the model, and for the defaults.
    cards_dir: folder of *.yaml cards; default `cards_dir()` (the installed `horse_jax.cards`).

  Returns:
    {"name", "dtype", "edit_modules", "horen": {"editor": {"layer", ...}}, "sharding", ...}.

  Raises:
    UserError: no config was given and nothing matched (defaults need a config), or a card file is
      malformed.
  """
  cards = load_cards(str(cards_dir or CARDS_DIR))
  for candidate in _candidates(path_or_name, config):
    if candidate in cards and _fits(cards[candidate], config):
      return _copy(cards[candidate])
    key = _key(candidate)
    for card in cards.values():
      if key and key in _card_keys(card) and _fits(card, config):
        return _copy(card)
  if config is None:
    raise UserError(f"no model card matches {os.fspath(path_or_name)!r} "
                    f"(cards: {', '.join(sorted(cards)) or 'none found'})")
  return default_card(config)


def _copy(card: dict[str, Any]) -> dict[str, Any]:
  return yaml.safe_load(yaml.safe_dump(card))
