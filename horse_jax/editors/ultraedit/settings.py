"""UltraEdit settings: one frozen, typed dataclass tree, the reference's hparams names.

`UltraEditEditorSettings` is the `editor.*` group (the flat keys of the reference's
`hparams/ULTRAEDIT/*.yaml`: `lr`, `token`, `batch_size`, `batch_size_once`, `editor_batch_size`);
`model.edit_modules` is its `inner_params`. `UltraEditSettings` is the whole tree that
`horse_jax.settings` resolves `--config` / `--set` / the model card into.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from horse_jax.errors import UserError
from horse_jax.typed_config import DataSettings, ModelSettings, Settings, module_name, setting


@dataclasses.dataclass(frozen=True)
class UltraEditEditorSettings(Settings):
  """`editor.*` of UltraEdit (the reference's hparams names)."""

  lr: float = setting(
      1e-6, "scale of the value shifts v = -lr * sum(k^ * k^) * g^ (normalised key k^, gradient g^)")
  token: Literal["mask"] = setting(
      "mask", "cached positions: every attended token, BOS included (the reference's only choice)")
  batch_size: int = setting(
      1, "requests per edit step: one normaliser pass, one ridge solve and weight update each",
      minimum=1)
  batch_size_once: int = setting(
      1, "requests per forward / backward pass and per normaliser update (divides batch_size)",
      minimum=1)
  editor_batch_size: int = setting(
      1024, "rows per chunk of the value-shift computation (bounds memory; results do not change)",
      minimum=1)
  lifelong_normalizer: bool = setting(
      True, "keep the key / gradient statistics across edit steps (the paper); false starts each "
      "step from empty statistics, as the reference runner does")

  def __post_init__(self):
    super().__post_init__()
    if self.batch_size % self.batch_size_once:
      raise UserError(f"editor.batch_size={self.batch_size} must be a multiple of "
                      f"editor.batch_size_once={self.batch_size_once}")


@dataclasses.dataclass(frozen=True)
class UltraEditModel(ModelSettings):
  """`model.*` of UltraEdit."""

  edit_modules: tuple[str, ...] | None = setting(
      None, "edited modules (HF names; the reference's inner_params); None = the model card's "
      "`ultraedit` section, else the last six MLP output projections", parse=module_name)


@dataclasses.dataclass(frozen=True)
class UltraEditSettings(Settings):
  """Every setting UltraEdit reads."""

  model: UltraEditModel = UltraEditModel()
  data: DataSettings = DataSettings()
  editor: UltraEditEditorSettings = UltraEditEditorSettings()
