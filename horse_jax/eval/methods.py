"""Editing methods as sweep adapters: a small registry of functions the sweep calls per cell.

Two kinds:
  batch       run(ctx, records, options, seed) -> scores        all edits applied at once, scored
              (horse, malmen, mend; `unedited` is the no-edit baseline: post = pre)
  sequential  SequentialMethod(start, edit, fns)                 edits one after another; the sweep
              (horen, grace)                                     scores each edit right after it is
                                                                 made ("immediate") and every edit so
                                                                 far at each checkpoint ("final")
`ctx` is a `CellContext`: the model, tokenizer and a `score(records, logits_fn, generate_fn)` closure
that already knows the pre-edit functions and the evaluation settings. `options` is the method's
entry of the sweep YAML (e.g. {"name": "horse", "hypernet": DIR, "settings": {...}}).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax

from horse_jax.data.records import EditRecord
from horse_jax.errors import UserError


@dataclasses.dataclass
class CellContext:
  """What an adapter needs to edit and score one cell.

  Attributes:
    model: the unedited `horse_jax.models.Model`.
    tokenizer: its tokenizer.
    score: (records, post_logits_fn, post_generate_fn=None, batch_size=None) -> score_records output.
    logits_fn: model -> EditBatch logits fn (jitted forward of that model).
    generate_fn: model -> generate fn, or None when the sweep scores teacher-forced only.
    model_path: where the model came from (adapters may read its model card).
    progress: show progress bars.
  """

  model: Any
  tokenizer: Any
  score: Callable[..., dict]
  logits_fn: Callable[[Any], Callable]
  generate_fn: Callable[[Any], Callable] | None
  model_path: str = ""
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class SequentialMethod:
  """start(ctx, options, seed) -> state; edit(ctx, state, record) -> state;
  fns(ctx, state) -> (post_logits_fn, post_generate_fn or None)."""

  start: Callable[[CellContext, Mapping[str, Any], int], Any]
  edit: Callable[[CellContext, Any, EditRecord], Any]
  fns: Callable[[CellContext, Any], tuple[Callable, Callable | None]]


BATCH: dict[str, Callable[[CellContext, Sequence[EditRecord], Mapping[str, Any], int], dict]] = {}
SEQUENTIAL: dict[str, SequentialMethod] = {}


def register_batch(name: str, run: Callable) -> Callable:
  """Adds (or replaces) a batch method."""
  BATCH[name] = run
  return run


def register_sequential(name: str, method: SequentialMethod) -> SequentialMethod:
  """Adds (or replaces) a sequential method."""
  SEQUENTIAL[name] = method
  return method


def kind_of(name: str) -> str:
  if name in BATCH:
    return "batch"
  if name in SEQUENTIAL:
    return "sequential"
  known = ", ".join(sorted(BATCH) + sorted(SEQUENTIAL))
  raise UserError(f"unknown method {name!r}; known: {known}")


# ---- unedited: the baseline (and the machinery test) ----


def run_unedited(ctx: CellContext, records, options, seed) -> dict:
  del options, seed
  gen = ctx.generate_fn(ctx.model) if ctx.generate_fn else None
  return ctx.score(records, ctx.logits_fn(ctx.model), gen)


register_batch("unedited", run_unedited)


# ---- HORSE / MALMEN / MEND (horse_jax.editors.hypernet) ----


def _hypernet_editor(hypernet, method: str, ctx: CellContext, options, seed):
  """(cfg, state): the trained hypernetwork in `options["hypernet"]` when given, else fresh nets.

  Settings: the method's defaults, the model card's edit modules, then `options["settings"]`
  (reference names, e.g. {"editor": {"lr": 1e-5}, "data": {"batch_size": 32}}).
  """
  from horse_jax import config as config_lib  # noqa: PLC0415
  defaults = hypernet.default_settings(method)
  try:
    from horse_jax.cli.edit_hypernet import model_defaults  # noqa: PLC0415  (model card lookup)
    defaults["model"]["edit_modules"] = model_defaults(ctx.model_path, ctx.model)["model"]["edit_modules"]
  except ImportError:
    pass
  settings = config_lib.merge(defaults, options.get("settings") or {}, strict=False,
                              where=f"methods.{options.get('label', method)}.settings")
  folder = options.get("hypernet")
  if not folder:
    cfg = hypernet.from_settings(method, settings, ctx.model)
    return cfg, hypernet.init(cfg, jax.random.PRNGKey(seed))
  from horse_jax.editors.hypernet.checkpoint import load_for_editing  # noqa: PLC0415
  given = ((options.get("settings") or {}).get("data") or {}).get("batch_size")
  return load_for_editing(folder, method, ctx.model, settings["editor"]["batch_size"], given,
                          f"methods.{options.get('label', method)}.hypernet {folder}")


def run_hypernet(method: str, ctx: CellContext, records, options, seed) -> dict:
  from horse_jax.editors import hypernet  # noqa: PLC0415
  cfg, state = _hypernet_editor(hypernet, method, ctx, options, seed)
  batches = hypernet.edit_batches(ctx.tokenizer, records, cfg.lm_batch)
  shifts, _ = hypernet.edit(state, ctx.model, cfg, batches)
  edited = hypernet.apply(ctx.model, shifts)
  return ctx.score(records, ctx.logits_fn(edited), ctx.generate_fn(edited) if ctx.generate_fn else None)


for _name in ("horse", "malmen", "mend"):
  register_batch(_name, functools.partial(run_hypernet, _name))


# ---- HoReN / GRACE (horse_jax.editors.codebook) ----


def _codebook_card(ctx: CellContext) -> dict[str, Any]:
  """`editor.*` defaults from the model card's `horen` entry (layer, threshold, query strategy);
  without a card the layer is the down-projection of layer round(0.9 L)."""
  card: dict[str, Any] = {}
  try:
    from horse_jax.models.cards import card_for  # noqa: PLC0415
    card = dict((card_for(ctx.model_path, ctx.model.config) or {}).get("horen") or {})
  except (ImportError, UserError):
    card = {}
  from horse_jax.models import names  # noqa: PLC0415
  cfg = ctx.model.config
  index = min(int(round(0.9 * cfg.num_layers)), cfg.num_layers - 1)
  # default_edit_modules(cfg, k) lists the MLP output modules of the last k layers, lowest first.
  out = {"layer": card.get("layer") or names.default_edit_modules(cfg, cfg.num_layers - index)[0]}
  if card.get("threshold") is not None:
    out["hopfield_key_match_threshold"] = float(card["threshold"])
  if card.get("query_strategy"):
    out["query_selection_strategy"] = card["query_strategy"]
  out["card_editor"] = dict(card.get("editor") or {})  # other HoReN `editor.*` defaults of the card
  return out


def _codebook_start(method: str, ctx: CellContext, options, seed):
  from horse_jax.editors.codebook import settings as settings_lib, state as state_lib  # noqa: PLC0415
  from horse_jax.models import names  # noqa: PLC0415
  card = _codebook_card(ctx)
  card_editor = card.pop("card_editor")
  if method != "horen":  # the card's extra editor defaults are tuned for HoReN only
    card_editor = {}
  editor = {"seed": seed, **card, **card_editor,
            **((options.get("settings") or {}).get("editor") or {})}
  settings = settings_lib.from_editor_dict(method, editor, editor["layer"])
  d_in, d_out = names.get_kernel(ctx.model.params, settings.layer).shape
  return settings, state_lib.init(settings, int(d_in), int(d_out))


def _codebook_edit(ctx: CellContext, state, record: EditRecord):
  from horse_jax.data.unke import tokenize_record  # noqa: PLC0415  (UnKE records: chat prompts)
  from horse_jax.editors.codebook import edit as edit_lib  # noqa: PLC0415
  settings, book = state
  batch = tokenize_record(ctx.tokenizer, record)
  book, _ = edit_lib.apply_edit(ctx.model, book, batch, 0, settings)
  return settings, book


def _codebook_fns(ctx: CellContext, state):
  from horse_jax.editors.codebook import infer  # noqa: PLC0415
  settings, book = state
  gen = infer.generate_fn(ctx.model, book, settings) if ctx.generate_fn else None
  return infer.logits_fn(ctx.model, book, settings), gen


for _name in ("horen", "grace"):
  register_sequential(_name, SequentialMethod(functools.partial(_codebook_start, _name), _codebook_edit,
                                              _codebook_fns))
