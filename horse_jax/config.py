"""Nested-dict settings of sweeps: YAML files and `--set a.b=v` over a defaults tree.

Editor settings (`editor.*`, `model.edit_modules`, `data.*`) are declared and resolved in
`horse_jax.settings`; this module serves trees whose defaults are a plain dict (the sweep YAML).
`merge` refuses keys that the defaults do not know, naming them and the closest known key.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Iterable, Mapping

import yaml

from horse_jax.errors import UserError
from horse_jax.settings import load_yaml


def merge(defaults: Mapping[str, Any], updates: Mapping[str, Any], *, strict: bool = True,
          where: str = "config", _prefix: str = "") -> dict[str, Any]:
  """Deep-merges `updates` into a copy of `defaults`.

  Args:
    defaults: the command's full settings tree.
    updates: values to override.
    strict: refuse keys missing from `defaults` (a typo must not be silently ignored).
    where: names the source in errors.

  Returns:
    The merged tree.
  """
  out = copy.deepcopy(dict(defaults))
  for key, value in updates.items():
    full = f"{_prefix}{key}"
    if key not in out:
      if strict:
        close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1, cutoff=0.5)
        hint = f"; did you mean {_prefix + close[0]!r}?" if close else ""
        raise UserError(f"{where}: unknown setting {full!r}{hint}")
      out[key] = copy.deepcopy(value)
    elif isinstance(out[key], dict) and isinstance(value, Mapping):
      out[key] = merge(out[key], value, strict=strict, where=where, _prefix=f"{full}.")
    else:
      out[key] = copy.deepcopy(value)
  return out


def parse_override(text: str) -> dict[str, Any]:
  """`a.b.c=value` -> {"a": {"b": {"c": value}}}, with the value parsed as YAML (1e-5, [1,2], true)."""
  if "=" not in text:
    raise UserError(f"--set {text!r}: expected key=value")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw != "" else ""
  except yaml.YAMLError:
    value = raw
  node: dict[str, Any] = {}
  root = node
  parts = key.strip().split(".")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = value
  return root


def resolve(defaults: Mapping[str, Any], config_file: str | None = None,
            overrides: Iterable[str] = (), *, strict_file: bool = False) -> dict[str, Any]:
  """defaults <- YAML file <- each `--set`, in that order.

  Reference YAML files carry keys this project does not use (hydra bookkeeping, other methods'
  settings), so unknown file keys are kept unless `strict_file`; unknown `--set` keys are errors.
  """
  settings = copy.deepcopy(dict(defaults))
  if config_file:
    settings = merge(settings, load_yaml(config_file), strict=strict_file, where=str(config_file))
  for text in overrides:
    settings = merge(settings, parse_override(text), strict=True, where=f"--set {text}")
  return settings
