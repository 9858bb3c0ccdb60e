"""HoReN / GRACE settings: one frozen, typed dataclass per method, fields named as in the reference.

`CodebookSettings` is the `editor.*` group of HoReN (the reference's hparams names); GRACE's differs in
its defaults only (`GraceCodebookSettings`: raw Euclidean keys of the last prompt token). Both are
hashable, so the jitted edit and inference programs take them as a static argument. The float values
that a sweep changes (learning rate, retrieval constants) must not recompile a program: they travel
as one traced pytree, `RetrievalHyper` (`hyper_of`), next to the static key (`jit_key`).

`HorenSettings` / `GraceSettings` are a method's whole settings tree (`model`, `data`, `editor`,
`eval`), the classes `horse_jax.settings` resolves `--config` / `--set` / the model card into.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping, NamedTuple

from horse_jax.errors import UserError
from horse_jax.models import names as names_lib
from horse_jax.typed_config import (DataSettings, ModelSettings, Settings, coerce, fields, module_name,
                                    new_default, setting, to_flat)

_PERC = re.compile(r"^last_(\d+)_perc_prompt_tokens_avg$")
_LASTN = re.compile(r"^last_(\d+)_prompt_tokens_avg$")


def parse_strategy(name: str) -> tuple[str, int]:
  """Query strategy name -> (kind, number).

  Returns:
    ("last", 0), ("first", 0), ("perc", X) or ("lastn", N).

  Raises:
    UserError: an unknown name.
  """
  if name == "last_prompt_token":
    return "last", 0
  if name == "first_prompt_token":
    return "first", 0
  m = _PERC.match(name)
  if m and 0 < int(m.group(1)) <= 100:
    return "perc", int(m.group(1))
  m = _LASTN.match(name)
  if m and int(m.group(1)) > 0:
    return "lastn", int(m.group(1))
  raise UserError(f"editor.query_selection_strategy={name!r}: expected last_prompt_token, "
                  "first_prompt_token, last_X_perc_prompt_tokens_avg or last_N_prompt_tokens_avg")


@dataclasses.dataclass(frozen=True)
class CodebookSettings(Settings):
  """Everything that shapes a HoReN edit (GRACE: `GraceCodebookSettings`); static under jit."""

  method: str = "horen"  # which editor (set by the class; not a setting of its own)
  layer: str | None = setting(
      None, "wrapped linear module (HF name); None = the model card's HoReN layer, else the MLP "
      "output projection at depth round(0.9 L)", parse=module_name)
  n_iter: int = setting(50, "Adam steps per edit", minimum=1)
  edit_lr: float = setting(1.0, "Adam learning rate of a value")
  adapter_mode: Literal["value", "lora"] = setting("value", "learned vector per key, or per-key LoRA")
  val_init: Literal["cold", "warm"] = setting(
      "cold", "new value: uniform [0, 1) (cold) or the layer's own output at p (warm)")
  normalize_codebook_keys: bool = setting(
      True, "L2-normalize queries, keys and Hopfield iterates (GRACE: raw Euclidean keys)")
  query_selection_strategy: str = setting(
      "last_50_perc_prompt_tokens_avg", "query from the layer input: last_prompt_token, "
      "first_prompt_token, last_X_perc_prompt_tokens_avg or last_N_prompt_tokens_avg")
  hopfield_retrieval_alpha: float = setting(0.1, "damping of the Hopfield update")
  hopfield_retrieval_beta: float = setting(20.0, "inverse temperature of retrieval")
  hopfield_retrieval_eps: float = setting(1e-5, "retrieval convergence tolerance")
  hopfield_retrieval_max_iter: int = setting(1, "Hopfield iterations", minimum=0)
  hopfield_key_match_threshold: float = setting(
      0.75, "strict match threshold on the retrieval score (reference range 0.55-0.85 per model)")
  edit_span: Literal["last", "onward"] = setting(
      "last", "change only y[p] (reference) or also every later position")
  label_match: Literal["mean", "exact"] = setting(
      "mean", "same-label test: equal mean of the label array (reference) or exact tokens")
  lora_rank: int = setting(4, "LoRA rank per key (adapter_mode lora)", minimum=1)
  lora_scale: float = setting(1.0, "LoRA output scale")
  grace_eps: float = setting(1.0, "GRACE: initial deferral radius of a new key")
  initial_capacity: int = setting(64, "codebook rows preallocated (doubles when full)", minimum=2)
  edit_block: int = setting(
      16, "sequential edits per compiled program (1 = one at a time, the reference loop; every "
      "size gives the same codebook)", minimum=1)
  seed: int = setting(0, "seed of value/LoRA initialisation (--seed sets it)")

  def __post_init__(self):
    super().__post_init__()
    if self.method not in ("horen", "grace"):
      raise UserError(f"method {self.method!r}: expected horen or grace")
    parse_strategy(self.query_selection_strategy)
    if self.method == "grace" and self.adapter_mode != "value":
      raise UserError("GRACE supports editor.adapter_mode=value only")

  @property
  def lora_r(self) -> int:
    """Rank of the stored LoRA factors (0 in value mode, so they cost nothing)."""
    return self.lora_rank if self.adapter_mode == "lora" else 0

  def to_editor_dict(self) -> dict[str, Any]:
    """The `editor.*` settings (reference names), for settings.json."""
    return to_flat(self)


@dataclasses.dataclass(frozen=True)
class GraceCodebookSettings(CodebookSettings):
  """GRACE's `editor.*` group: HoReN's fields, GRACE's defaults (the reference's GRACE keys)."""

  method: str = "grace"
  normalize_codebook_keys: bool = new_default(CodebookSettings, "normalize_codebook_keys", False)
  query_selection_strategy: str = new_default(CodebookSettings, "query_selection_strategy",
                                              "last_prompt_token")


@dataclasses.dataclass(frozen=True)
class CodebookEval(Settings):
  """`eval.*` of the codebook editors."""

  batch_size: int = setting(64, "scoring batch size of `horse-jax edit`", minimum=1)


@dataclasses.dataclass(frozen=True)
class HorenSettings(Settings):
  """Every setting HoReN reads."""

  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  editor: CodebookSettings = CodebookSettings()
  eval: CodebookEval = CodebookEval()


@dataclasses.dataclass(frozen=True)
class GraceSettings(HorenSettings):
  """Every setting GRACE reads (HoReN's, with GRACE's editor defaults)."""

  editor: GraceCodebookSettings = GraceCodebookSettings()


EDITOR_CLASSES = {"horen": CodebookSettings, "grace": GraceCodebookSettings}


class RetrievalHyper(NamedTuple):
  """The float settings that enter the jitted programs as traced scalars (a pytree), so that
  sweeping a threshold or a learning rate reuses the compiled programs."""

  edit_lr: Any
  hopfield_retrieval_alpha: Any
  hopfield_retrieval_beta: Any
  hopfield_retrieval_eps: Any
  hopfield_key_match_threshold: Any
  lora_scale: Any
  grace_eps: Any


def hyper_of(settings: CodebookSettings) -> RetrievalHyper:
  """The traced floats of `settings`."""
  return RetrievalHyper(*(float(getattr(settings, k)) for k in RetrievalHyper._fields))


def jit_key(settings: CodebookSettings) -> CodebookSettings:
  """The static part of `settings`: the `RetrievalHyper` fields at the class defaults (programs read
  them from the traced pytree), and `edit_block` reset (programs see the block through shapes)."""
  base = type(settings)()
  return dataclasses.replace(settings, edit_block=base.edit_block,
                             **{k: getattr(base, k) for k in RetrievalHyper._fields})


def default_layer(config) -> str:
  """The wrapped module without a card or a setting: the MLP output projection of layer
  round(0.9 L) (HoReN wraps a late MLP down-projection; the reference uses layer 29 of 32)."""
  index = min(int(round(0.9 * config.num_layers)), config.num_layers - 1)
  # default_edit_modules(cfg, k) lists the MLP output modules of the last k layers, lowest first.
  return names_lib.default_edit_modules(config, config.num_layers - index)[0]


def from_resolved(resolved, config) -> CodebookSettings:
  """The editor settings of a `horse_jax.settings.Resolved` of horen/grace, layer filled in."""
  editor = resolved.typed.editor
  return editor if editor.layer else dataclasses.replace(editor, layer=default_layer(config))


def from_editor_dict(method: str, editor: Mapping[str, Any],
                     layer: str | None = None) -> CodebookSettings:
  """Settings from an `editor.*` mapping (settings.json; keys without a field are ignored).

  Args:
    method: "horen" or "grace".
    editor: reference-named values; missing keys take the method's defaults.
    layer: the wrapped module when `editor` has none.
  """
  if method not in EDITOR_CLASSES:
    raise UserError(f"method {method!r}: expected horen or grace")
  cls = EDITOR_CLASSES[method]
  info = fields(cls)
  values = {k: coerce(info[k], v, "codebook settings") for k, v in editor.items() if k in info}
  if not values.get("layer"):
    values["layer"] = layer
  return dataclasses.replace(cls(), **values)
