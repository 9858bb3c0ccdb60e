"""The static editor of HORSE / MALMEN / MEND: its settings plus the edited modules and their shapes."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from horse_jax.editors.hypernet.settings import (HorseSettings, HypernetData, HypernetSettings,
                                                 MalmenSettings, MendSettings)
from horse_jax.errors import UserError
from horse_jax.models import names as names_lib
from horse_jax.typed_config import flatten, from_flat

SETTINGS_CLASSES = {"horse": HorseSettings, "malmen": MalmenSettings, "mend": MendSettings}
METHODS = tuple(SETTINGS_CLASSES)
_EDITOR, _DATA = HypernetSettings(), HypernetData()  # the defaults (HORSE's where methods differ)


def default_settings(method: str) -> dict[str, Any]:
  """Reference-named settings tree of `method` (its settings class's defaults)."""
  if method not in METHODS:
    raise UserError(f"unknown hypernetwork method {method!r} (one of {', '.join(METHODS)})")
  return dataclasses.asdict(SETTINGS_CLASSES[method]())


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
  """Everything static about one editor (hashable: used as a jit static argument).

  Attributes:
    method: horse | malmen | mend.
    modules: edited module names, config order.
    shapes: (d_k, d_v) per module.
    rank: block rank (clipped to the width).
    n_blocks: residual blocks per hypernetwork.
    lr: initial editing learning rate.
    meta_lr: Adam learning rate of meta-training.
    loc_coef: KL weight (MALMEN/MEND locality term).
    max_grad_norm: global-norm clip of the meta-gradient.
    chunk: token chunk of the hypernetwork and its backward (`editor.batch_size`).
    token: "ans" (answer positions) or "all" (every attended position).
    spread: HORSE spread variant, "reference" or "gram_schmidt".
    lm_batch: LM mini-batch size (`data.batch_size`).
  """

  method: str
  modules: tuple[str, ...]
  shapes: tuple[tuple[int, int], ...]
  rank: int = _EDITOR.rank
  n_blocks: int = _EDITOR.n_blocks
  lr: float = _EDITOR.lr
  # Not part of the jit key: the training programs read it from the optimizer state
  # (`state.optimizer`, optax.inject_hyperparams), so another meta_lr compiles nothing new.
  meta_lr: float = dataclasses.field(default=_EDITOR.meta_lr, compare=False)
  loc_coef: float = _EDITOR.loc_coef
  max_grad_norm: float = _EDITOR.max_grad_norm
  chunk: int = _EDITOR.batch_size
  token: str = _EDITOR.token
  spread: str = _EDITOR.spread
  lm_batch: int = _DATA.batch_size

  @property
  def shape_keys(self) -> tuple[str, ...]:
    """"{d_k}x{d_v}" per module: the hypernetwork it uses."""
    return tuple(f"{k}x{v}" for k, v in self.shapes)

  @property
  def module_index(self) -> tuple[int, ...]:
    """m per module: its rank among the edited modules of the same shape, in config order."""
    seen: dict[str, int] = {}
    out = []
    for key in self.shape_keys:
      out.append(seen.get(key, 0))
      seen[key] = seen.get(key, 0) + 1
    return tuple(out)

  @property
  def lowest_layer(self) -> int:
    return min(names_lib.layer_index(n) for n in self.modules)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["modules"] = list(self.modules)
    d["shapes"] = [list(s) for s in self.shapes]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "HypernetConfig":
    d = dict(d)
    d["modules"] = tuple(d["modules"])
    d["shapes"] = tuple(tuple(int(x) for x in s) for s in d["shapes"])
    return cls(**d)


def module_shapes(params: dict, modules: Sequence[str]) -> tuple[tuple[int, int], ...]:
  """(d_k, d_v) of each module's kernel [d_in, d_out]."""
  return tuple(tuple(int(x) for x in names_lib.get_kernel(params, n).shape) for n in modules)


def from_settings(method: str, settings, model) -> HypernetConfig:
  """Builds the static config from resolved settings and the model it edits.

  Args:
    method: horse | malmen | mend.
    settings: a `horse_jax.settings.Resolved`, the method's settings dataclass (`HorseSettings`,
      ...), or a reference-named tree ({"model", "data", "editor"}, missing keys at the defaults).
    model: the LM (its config names the default edit modules; its params give module shapes).

  Returns:
    The HypernetConfig.
  """
  if method not in METHODS:
    raise UserError(f"unknown hypernetwork method {method!r}")
  if hasattr(settings, "typed"):  # a horse_jax.settings.Resolved
    settings = settings.typed
  elif isinstance(settings, Mapping):
    settings = from_flat(SETTINGS_CLASSES[method], flatten(settings))
  ed, data = settings.editor, settings.data
  modules = settings.model.edit_modules or names_lib.default_edit_modules(model.config)
  modules = tuple(str(m) for m in modules)
  names_lib.check_module_names(model.config, modules)
  shapes = module_shapes(model.params, modules)
  if method == "horse" and len(set(s[1] for s in shapes)) > 1:
    raise UserError("model.edit_modules: the HORSE spread needs edited modules with one output width")
  width = max(k + v for k, v in shapes)
  return HypernetConfig(
      method=method, modules=modules, shapes=shapes, rank=min(ed.rank, width),
      n_blocks=ed.n_blocks, lr=ed.lr, meta_lr=ed.meta_lr, loc_coef=ed.loc_coef,
      max_grad_norm=ed.max_grad_norm, chunk=ed.batch_size, token=ed.token, spread=ed.spread,
      lm_batch=data.batch_size)

