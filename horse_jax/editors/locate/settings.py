"""ROME / MEMIT / AlphaEdit settings: one frozen, typed dataclass per method, reference names.

The fields are the keys of the HoReN reference's `hparams/{ROME,MEMIT,AlphaEdit}/llama3-8b.yaml`,
with those files' values as defaults, declared once on `LocateEditorSettings` and given other
defaults per method with `new_default`. Keys of those files that are not settings here (module
templates of the reference's hooks, `mom2_dataset`, `P_loc`, ...) are listed with the reason in
`horse_jax.settings.RUN_KEYS`.

Context templates: the reference samples them from the model without a seed at the first edit
(prefixes generated from "The", "Therefore", "Because", "I", "You", each followed by ". {}"); here
they are an explicit list (`editor.context_templates`), by default a fixed list of the same shape,
so that runs compare. The bare prompt "{}" is always the first template, as in the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from horse_jax.errors import UserError
from horse_jax.typed_config import DataSettings, ModelSettings, Settings, new_default, setting

# Fixed stand-ins for the reference's sampled context prefixes: ROME samples 2 per start word of
# about 5 tokens and 2 of about 10 (`context_template_length_params: [[5, 10], [10, 10]]`), MEMIT
# and AlphaEdit one per start word of about 10 tokens.
_SHORT = ("The first thing to know", "The best way to", "Therefore, it is important",
          "Therefore, we can say", "Because of this, the", "Because it is a", "I have been thinking",
          "I am not sure", "You can find more", "You may also like")
_LONG = ("The following is a list of the most common questions",
         "Therefore, the committee decided to postpone the meeting until",
         "Because of the weather, the game was moved to",
         "I was born in a small town near the", "You can use this tool to find out more",
         "The city has a long history of trade and",
         "Therefore, it is important to understand how the system",
         "Because the results were not clear, the team",
         "I think this is one of the best things", "You will need to bring your own food and")
ROME_TEMPLATES = tuple(f"{t}. {{}}" for t in _SHORT + _LONG)
MEMIT_TEMPLATES = tuple(f"{t}. {{}}" for t in _LONG[:5])


@dataclasses.dataclass(frozen=True)
class LocateEditorSettings(Settings):
  """`editor.*` shared by ROME, MEMIT and AlphaEdit (defaults: the reference's ROME llama3-8b)."""

  method: str = "rome"  # which editor (set by the class; not a setting of its own)
  layers: tuple[int, ...] = setting(
      (5,), "decoder layers whose `rewrite_module_tmp` is edited (MEMIT/AlphaEdit: the target z "
      "lives at the output of the last one)", minimum=0)
  rewrite_module_tmp: str = setting(
      "model.layers.{}.mlp.down_proj", "the edited linear module, `{}` = layer index (HF name)")
  fact_token: Literal["subject_last"] = setting(
      "subject_last", "key position: the subject's last token (BOS counted, right padding)")
  v_num_grad_steps: int = setting(
      25, "Adam iterations of the target optimisation (the last one only checks the loss)",
      minimum=1)
  v_lr: float = setting(0.5, "Adam learning rate of the target optimisation")
  v_loss_layer: int = setting(
      31, "layer whose output gives the target NLL (through the final norm and LM head); "
      "values past the last layer mean the last", minimum=0)
  v_weight_decay: float = setting(
      1e-3, "weight of |delta| / |target_init|^2 in the target loss (norm not squared)")
  clamp_norm_factor: float = setting(
      4.0, "after each step |delta| is clamped to this times |target_init|")
  kl_factor: float = setting(0.0625, "weight of KL(current || initial) on the '{subject} is a' prompt")
  mom2_n_samples: int = setting(
      100000, "corpus texts (first N) of the second-moment statistics C = E[k k^T]", minimum=1)
  stats_dir: str = setting(
      "checkpoints/stats", "folder caching C per model, layer and corpus (computed once)")
  context_templates: tuple[str, ...] = setting(
      ROME_TEMPLATES, "context templates besides the bare prompt '{}' (each with one '{}'); the "
      "reference samples them from the model")

  def __post_init__(self):
    super().__post_init__()
    if self.method not in ("rome", "memit", "alphaedit"):
      raise UserError(f"method {self.method!r}: expected rome, memit or alphaedit")
    if "{}" not in self.rewrite_module_tmp:
      raise UserError(f"editor.rewrite_module_tmp={self.rewrite_module_tmp!r} has no '{{}}' "
                      "for the layer index")
    if len(set(self.layers)) != len(self.layers):
      raise UserError(f"editor.layers={list(self.layers)}: a layer is listed twice")
    for t in self.context_templates:
      if t.count("{}") != 1:
        raise UserError(f"editor.context_templates: {t!r} must hold '{{}}' exactly once")

  def module(self, layer: int) -> str:
    """The edited module of `layer` (HF name)."""
    return self.rewrite_module_tmp.replace("{}", str(layer))


@dataclasses.dataclass(frozen=True)
class RomeEditorSettings(LocateEditorSettings):
  """ROME's `editor.*` (hparams/ROME/llama3-8b.yaml)."""

  mom2_adjustment: bool = setting(
      True, "left vector u = C^-1 k (true) or k (false), normalised to unit length")


@dataclasses.dataclass(frozen=True)
class MemitEditorSettings(LocateEditorSettings):
  """MEMIT's `editor.*` (hparams/MEMIT/llama3-8b.yaml)."""

  method: str = "memit"
  layers: tuple[int, ...] = new_default(LocateEditorSettings, "layers", (4, 5, 6, 7, 8))
  v_num_grad_steps: int = new_default(LocateEditorSettings, "v_num_grad_steps", 20)
  v_weight_decay: float = new_default(LocateEditorSettings, "v_weight_decay", 0.5)
  clamp_norm_factor: float = new_default(LocateEditorSettings, "clamp_norm_factor", 3.0)
  context_templates: tuple[str, ...] = new_default(LocateEditorSettings, "context_templates",
                                                   MEMIT_TEMPLATES)
  mom2_update_weight: float = setting(
      20000.0, "lambda of the solve (lambda C + K K^T)^-1 K", minimum=0)


@dataclasses.dataclass(frozen=True)
class AlphaEditEditorSettings(LocateEditorSettings):
  """AlphaEdit's `editor.*` (hparams/AlphaEdit/llama3-8b.yaml)."""

  method: str = "alphaedit"
  layers: tuple[int, ...] = new_default(LocateEditorSettings, "layers", (4, 5, 6, 7, 8))
  v_lr: float = new_default(LocateEditorSettings, "v_lr", 0.1)
  v_weight_decay: float = new_default(LocateEditorSettings, "v_weight_decay", 0.5)
  clamp_norm_factor: float = new_default(LocateEditorSettings, "clamp_norm_factor", 0.75)
  context_templates: tuple[str, ...] = new_default(LocateEditorSettings, "context_templates",
                                                   MEMIT_TEMPLATES)
  nullspace_threshold: float = setting(
      2e-2, "eigenvalues of C below this span the null space the projector P keeps", minimum=0)
  L2: float = setting(10.0, "ridge of the solve (P (K K^T + cache) + L2 I)^-1 P K R^T", minimum=0)


@dataclasses.dataclass(frozen=True)
class LocateEval(Settings):
  """`eval.*` of the locate-then-edit editors."""

  batch_size: int = setting(64, "scoring batch size of `horse-jax edit`", minimum=1)


@dataclasses.dataclass(frozen=True)
class RomeSettings(Settings):
  """Every setting ROME reads."""

  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  editor: RomeEditorSettings = RomeEditorSettings()
  eval: LocateEval = LocateEval()


@dataclasses.dataclass(frozen=True)
class MemitSettings(RomeSettings):
  """Every setting MEMIT reads."""

  editor: MemitEditorSettings = MemitEditorSettings()


@dataclasses.dataclass(frozen=True)
class AlphaEditSettings(RomeSettings):
  """Every setting AlphaEdit reads."""

  editor: AlphaEditEditorSettings = AlphaEditEditorSettings()
