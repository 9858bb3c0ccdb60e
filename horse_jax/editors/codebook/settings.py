"""HoReN / GRACE settings: the reference's `editor.*` names, parsed into one hashable dataclass.

The dataclass is frozen and hashable so the jitted edit and inference functions take it as a static
argument: every edit with the same settings reuses one compiled program per capacity bucket.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from horse_jax import settings as settings_lib
from horse_jax.errors import UserError
from horse_jax.models import names as names_lib

# HoReN's `editor.*` defaults under the reference names (declared once, in horse_jax.settings; GRACE
# differs in normalize_codebook_keys and query_selection_strategy, see `settings_lib.defaults`).
DEFAULTS: dict[str, Any] = {k.split(".", 1)[1]: v for k, v in settings_lib.defaults("horen").items()
                            if k.startswith("editor.")}


def _d(name: str) -> Any:
  return DEFAULTS[name]


_PERC = re.compile(r"^last_(\d+)_perc_prompt_tokens_avg$")
_LASTN = re.compile(r"^last_(\d+)_prompt_tokens_avg$")


@dataclasses.dataclass(frozen=True)
class CodebookSettings:
  """Everything that shapes a HoReN/GRACE edit; static under jit.

  Attributes:
    method: "horen" or "grace".
    layer: HF name of the wrapped linear module, e.g. `model.layers.29.mlp.down_proj`.
    n_iter: Adam steps per edit.
    edit_lr: Adam learning rate.
    adapter_mode: "value" (add a learned vector) or "lora" (per-key low-rank delta of y[p]).
    val_init: "cold" or "warm".
    normalize: L2-normalize queries/keys and the Hopfield iterates.
    strategy: query strategy name (see `query.py`).
    alpha, beta, eps, max_iter: damped Hopfield retrieval.
    threshold: strict match threshold on the retrieval score.
    label_match: "mean" or "exact" (see `labels.py`).
    edit_span: "last" (reference: only y[p] changes) or "onward" (the change at p is also added at
      every later position; generation applies it during prefill only).
    lora_rank, lora_scale: LoRA mode.
    grace_eps: GRACE initial deferral radius.
    initial_capacity: rows preallocated at init.
    edit_block: edits per compiled program in `edit.apply_edits` (1 = the one-at-a-time loop;
      the codebook is the same for every size). Not part of the programs' static key.
    seed: base seed for value/LoRA initialisation (folded with the edit counter).
  """

  method: str = "horen"
  layer: str = "model.layers.0.mlp.down_proj"
  n_iter: int = _d("n_iter")
  edit_lr: float = _d("edit_lr")
  adapter_mode: str = _d("adapter_mode")
  val_init: str = _d("val_init")
  normalize: bool = _d("normalize_codebook_keys")
  strategy: str = _d("query_selection_strategy")
  alpha: float = _d("hopfield_retrieval_alpha")
  beta: float = _d("hopfield_retrieval_beta")
  eps: float = _d("hopfield_retrieval_eps")
  max_iter: int = _d("hopfield_retrieval_max_iter")
  threshold: float = _d("hopfield_key_match_threshold")
  label_match: str = _d("label_match")
  edit_span: str = _d("edit_span")
  lora_rank: int = _d("lora_rank")
  lora_scale: float = _d("lora_scale")
  grace_eps: float = _d("grace_eps")
  initial_capacity: int = _d("initial_capacity")
  edit_block: int = _d("edit_block")
  seed: int = _d("seed")

  def __post_init__(self):
    if self.method not in ("horen", "grace"):
      raise UserError(f"method {self.method!r}: expected horen or grace")
    if self.adapter_mode not in ("value", "lora"):
      raise UserError(f"editor.adapter_mode={self.adapter_mode!r}: expected value or lora")
    if self.val_init not in ("cold", "warm"):
      raise UserError(f"editor.val_init={self.val_init!r}: expected cold or warm")
    if self.edit_span not in ("last", "onward"):
      raise UserError(f"editor.edit_span={self.edit_span!r}: expected last or onward")
    if self.label_match not in ("mean", "exact"):
      raise UserError(f"editor.label_match={self.label_match!r}: expected mean or exact")
    parse_strategy(self.strategy)
    if self.n_iter < 1 or self.max_iter < 0 or self.initial_capacity < 2 or self.edit_block < 1:
      raise UserError("editor.n_iter must be >= 1, hopfield_retrieval_max_iter >= 0, "
                      "initial_capacity >= 2, edit_block >= 1")
    if self.method == "grace" and self.adapter_mode != "value":
      raise UserError("GRACE supports editor.adapter_mode=value only")

  @property
  def lora_r(self) -> int:
    """Rank of the stored LoRA factors (0 in value mode, so they cost nothing)."""
    return self.lora_rank if self.adapter_mode == "lora" else 0

  def to_editor_dict(self) -> dict[str, Any]:
    """The `editor.*` settings tree (reference names), for settings.json."""
    return {
        "layer": self.layer, "n_iter": self.n_iter, "edit_lr": self.edit_lr,
        "adapter_mode": self.adapter_mode, "val_init": self.val_init,
        "normalize_codebook_keys": self.normalize, "query_selection_strategy": self.strategy,
        "hopfield_retrieval_alpha": self.alpha, "hopfield_retrieval_beta": self.beta,
        "hopfield_retrieval_eps": self.eps, "hopfield_retrieval_max_iter": self.max_iter,
        "hopfield_key_match_threshold": self.threshold, "label_match": self.label_match,
        "edit_span": self.edit_span,
        "lora_rank": self.lora_rank, "lora_scale": self.lora_scale, "grace_eps": self.grace_eps,
        "initial_capacity": self.initial_capacity, "edit_block": self.edit_block,
        "seed": self.seed,
    }


# Float settings that enter the jitted programs as traced scalars, so that sweeping a threshold or a
# learning rate reuses the compiled edit step instead of compiling a new one.
DYNAMIC = ("edit_lr", "alpha", "beta", "eps", "threshold", "lora_scale", "grace_eps")


def split_dynamic(settings: CodebookSettings) -> tuple[CodebookSettings, dict[str, float]]:
  """(settings with the DYNAMIC fields zeroed: the static jit key, {field: value}).

  `edit_block` is reset too: programs see the block through their shapes, not the setting."""
  numbers = {k: float(getattr(settings, k)) for k in DYNAMIC}
  return dataclasses.replace(settings, edit_block=1, **{k: 0.0 for k in DYNAMIC}), numbers


def join_dynamic(static: CodebookSettings, numbers) -> CodebookSettings:
  """Inside a jitted function: the settings with the (traced) DYNAMIC values put back."""
  return dataclasses.replace(static, **{k: numbers[k] for k in DYNAMIC})


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


def default_layer(config) -> str:
  """The wrapped module without a card or a setting: the MLP output projection of layer
  round(0.9 L) (HoReN wraps a late MLP down-projection; the reference uses layer 29 of 32)."""
  index = min(int(round(0.9 * config.num_layers)), config.num_layers - 1)
  # default_edit_modules(cfg, k) lists the MLP output modules of the last k layers, lowest first.
  return names_lib.default_edit_modules(config, config.num_layers - index)[0]


def from_resolved(resolved, config) -> CodebookSettings:
  """Settings from a `horse_jax.settings.Resolved` of horen/grace and the model's config."""
  editor = resolved.editor()
  return from_editor_dict(resolved.method, editor, editor.get("layer") or default_layer(config))


def from_editor_dict(method: str, editor: Mapping[str, Any], layer: str) -> CodebookSettings:
  """Builds settings from an `editor.*` tree (keys other than the declared ones are not read here;
  `horse_jax.settings.resolve` is where unknown keys are refused).

  Args:
    method: "horen" or "grace".
    editor: the `editor` section (reference names, see DEFAULTS; missing keys take the method's
      declared defaults).
    layer: the resolved wrapped-module name (used when `editor.layer` is None).
  """
  own = {k.split(".", 1)[1]: v for k, v in settings_lib.defaults(method).items()
         if k.startswith("editor.")} if method in settings_lib.CODEBOOK else DEFAULTS
  e = {**own, **{k: v for k, v in editor.items() if k in DEFAULTS}}
  try:
    return CodebookSettings(
        method=method, layer=str(e["layer"] or layer), n_iter=int(e["n_iter"]),
        edit_lr=float(e["edit_lr"]), adapter_mode=str(e["adapter_mode"]),
        val_init=str(e["val_init"]), normalize=bool(e["normalize_codebook_keys"]),
        strategy=str(e["query_selection_strategy"]), alpha=float(e["hopfield_retrieval_alpha"]),
        beta=float(e["hopfield_retrieval_beta"]), eps=float(e["hopfield_retrieval_eps"]),
        max_iter=int(e["hopfield_retrieval_max_iter"]),
        threshold=float(e["hopfield_key_match_threshold"]), label_match=str(e["label_match"]),
        edit_span=str(e["edit_span"]),
        lora_rank=int(e["lora_rank"]), lora_scale=float(e["lora_scale"]),
        grace_eps=float(e["grace_eps"]), initial_capacity=int(e["initial_capacity"]),
        edit_block=int(e["edit_block"]), seed=int(e["seed"]))
  except (TypeError, ValueError) as err:
    raise UserError(f"editor settings: {err}") from None
