"""WISE settings: one frozen dataclass, fields named as in the HoReN reference's hparams/WISE files."""

from __future__ import annotations

import dataclasses
from typing import Literal

from horse_jax.editors.codebook.settings import CodebookEval, default_layer
from horse_jax.errors import UserError
from horse_jax.typed_config import DataSettings, ModelSettings, Settings, module_name, setting, to_flat


@dataclasses.dataclass(frozen=True)
class WiseEditorSettings(Settings):
  """`editor.*` of WISE (the reference's names and Llama-3-8B defaults)."""

  layer: str | None = setting(
      None, "edited linear module, copied as side memory (HF name); None = the model card's HoReN "
      "layer, else the MLP output projection at depth round(0.9 L)", parse=module_name)
  n_iter: int = setting(70, "SGD steps per edit (fewer when the loss settles below 0.02)", minimum=1)
  edit_lr: float = setting(1.0, "SGD learning rate of the side memory (weight decay 1e-5)")
  mask_ratio: float = setting(0.2, "share of the side memory's entries a shard's gradient mask keeps")
  norm_constraint: float = setting(1.0, "side-memory entries clamped to the original +- this")
  act_margin: tuple[float, ...] = setting(
      (5.0, 20.0, 10.0), "margins (alpha, beta, gamma) of the activation loss: out-of-scope below "
      "alpha, in-scope above beta, in-scope above out-of-scope by gamma")
  act_ratio: float = setting(0.88, "router: a memory answers when its activation exceeds "
                                   "act_ratio x the smallest activation of its edits")
  save_freq: int = setting(500, "edits per side memory (then it is stored and a fresh one starts)",
                           minimum=1)
  merge_freq: int = setting(1000, "edits between TIES merges of the last merge_freq/save_freq "
                                  "stored memories into one", minimum=1)
  merge_alg: Literal["ties"] = setting("ties", "merge of side memories (TIES: magnitude, sign sum)")
  densities: float = setting(0.53, "TIES: share of each memory's largest changes kept")
  weights: float = setting(1.0, "TIES: total weight of the merged memories (split evenly)")
  retrieve: bool = setting(True, "route each sequence to the memory with the largest activation "
                                 "(WISE-Retrieve; false, WISE-Merge, is not implemented)")
  replay: bool = setting(False, "replay past edits (not implemented; the reference default false)")
  objective_optimization: Literal["only_label"] = setting(
      "only_label", "edit loss on the target tokens only (the reference's only objective here)")
  context_templates: tuple[str, ...] | None = setting(
      None, "templates '{}' each edit is also trained in; None = '{}' plus 10 greedy "
      "continuations of the model (5 and 10 tokens after I / You / Because / Yes / Q:)")
  seed: int = setting(0, "seed of numpy's RandomState drawing each shard's gradient mask (the "
                         "reference draws from numpy's global RNG); --seed sets it")

  def __post_init__(self):
    super().__post_init__()
    if len(self.act_margin) != 3:
      raise UserError(f"WiseEditorSettings: act_margin={list(self.act_margin)}: expected "
                      "[alpha, beta, gamma]")
    if self.merge_freq % self.save_freq:
      raise UserError(f"WiseEditorSettings: merge_freq={self.merge_freq} must be a multiple of "
                      f"save_freq={self.save_freq}")
    if not self.retrieve:
      raise UserError("WiseEditorSettings: retrieve=false (WISE-Merge) is not implemented")
    if self.replay:
      raise UserError("WiseEditorSettings: replay=true is not implemented")

  @property
  def merge_num(self) -> int:
    """Stored memories merged into one at each merge."""
    return self.merge_freq // self.save_freq

  def to_editor_dict(self):
    """The `editor.*` settings (reference names), for metrics.json."""
    return to_flat(self)


@dataclasses.dataclass(frozen=True)
class WiseSettings(Settings):
  """Every setting WISE reads."""

  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  editor: WiseEditorSettings = WiseEditorSettings()
  eval: CodebookEval = CodebookEval()


def from_resolved(resolved, config) -> WiseEditorSettings:
  """The editor settings of a resolved `wise` run, the layer filled in."""
  editor = resolved.typed.editor
  return editor if editor.layer else dataclasses.replace(editor, layer=default_layer(config))
