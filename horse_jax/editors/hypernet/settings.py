"""HORSE / MALMEN / MEND settings: one frozen, typed dataclass per method, reference field names.

`HypernetSettings` is the `editor.*` group of HORSE (the reference's `config/editor/horse.yaml`
names); MALMEN and MEND differ in their defaults only (`lr`, and MEND's `token`). `HorseSettings`,
`MalmenSettings` and `MendSettings` are a method's whole tree (`model`, `data`, `editor`), the
classes `horse_jax.settings` resolves `--config` / `--set` / the model card into.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from horse_jax.typed_config import (DataSettings, ModelSettings, Settings, module_name, new_default,
                                    setting)


@dataclasses.dataclass(frozen=True)
class HypernetSettings(Settings):
  """`editor.*` of HORSE."""

  rank: int = setting(1920, "rank of the hypernetwork's low-rank blocks (clipped to the width)",
                      minimum=1)
  n_blocks: int = setting(2, "residual blocks per hypernetwork", minimum=1)
  lr: float = setting(1e-5, "initial editing learning rate (scales the predicted value differences)")
  meta_lr: float = setting(1e-5, "Adam learning rate of meta-training")
  loc_coef: float = setting(1.0, "weight of the locality loss in meta-training")
  max_grad_norm: float = setting(1.0, "global-norm clip of the meta-gradient")
  n_epochs: int = setting(1, "meta-training passes over --data when --steps is not given", minimum=1)
  batch_size: int = setting(1024, "token chunk of the hypernetwork and its backward", minimum=1)
  token: Literal["ans", "all"] = setting(
      "ans", "positions whose keys/gradients are cached: answer tokens or every attended token")
  spread: Literal["reference", "gram_schmidt"] = setting("reference", "HORSE spread variant")
  memo_cache_mb: int = setting(
      1024, "MiB per device for memoizing the unedited model's keys / value gradients of every "
      "training record (`horse-jax train`: the steps then skip the LM over the edit set, same "
      "results); 0, or a memo that does not fit, recomputes them every step as the reference does",
      minimum=0)


@dataclasses.dataclass(frozen=True)
class MalmenHypernetSettings(HypernetSettings):
  """`editor.*` of MALMEN: HORSE's fields, MALMEN's learning rate."""

  lr: float = new_default(HypernetSettings, "lr", 1e-6)


@dataclasses.dataclass(frozen=True)
class MendHypernetSettings(MalmenHypernetSettings):
  """`editor.*` of MEND: MALMEN's, caching every attended token."""

  token: Literal["ans", "all"] = new_default(HypernetSettings, "token", "all")


@dataclasses.dataclass(frozen=True)
class HypernetModel(ModelSettings):
  """`model.*` of the hypernetwork editors."""

  edit_modules: tuple[str, ...] | None = setting(
      None, "edited modules (HF names, config order); None = the model card's, else the last six MLP "
      "output projections", parse=module_name)


@dataclasses.dataclass(frozen=True)
class HypernetData(DataSettings):
  """`data.*` of the hypernetwork editors."""

  n_edits: int = setting(32, "edits per meta-training step (`horse-jax train`)", minimum=1)
  batch_size: int = setting(
      32, "LM mini-batch size of key/gradient caching (a trained hypernetwork keeps its own unless "
      "this is set by --config or --set: gradient scale depends on it)", minimum=1)


@dataclasses.dataclass(frozen=True)
class HorseSettings(Settings):
  """Every setting HORSE reads."""

  model: HypernetModel = HypernetModel()
  data: HypernetData = HypernetData()
  editor: HypernetSettings = HypernetSettings()


@dataclasses.dataclass(frozen=True)
class MalmenSettings(HorseSettings):
  """Every setting MALMEN reads."""

  editor: MalmenHypernetSettings = MalmenHypernetSettings()


@dataclasses.dataclass(frozen=True)
class MendSettings(HorseSettings):
  """Every setting MEND reads."""

  editor: MendHypernetSettings = MendHypernetSettings()
