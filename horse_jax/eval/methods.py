"""Editing methods as sweep adapters: a small registry of functions the sweep calls per cell.

Two kinds:
  batch       run(ctx, records, options, seed) -> scores        all edits applied at once, scored
              (horse, malmen, mend; `unedited` is the no-edit baseline: post = pre)
  sequential  SequentialMethod(start, edit, fns)                 edits one after another; the sweep
              (horen, grace, ultraedit, rome, memit, alphaedit,  scores each edit right after it is
               defer, wise)                                      made ("immediate") and every edit so
                                                                 far at each checkpoint ("final")
`ctx` is a `CellContext`: the model, tokenizer and a `score(records, logits_fn, generate_fn)` closure
that already knows the pre-edit functions and the evaluation settings. `options` is the method's
entry of the sweep YAML (e.g. {"name": "horse", "hypernet": DIR, "settings": {...}}).

The editing methods are thin adapters over the editor protocol (`horse_jax.editors.protocol`):
their settings resolve exactly as `horse-jax edit` resolves them (`cell_settings`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from horse_jax import settings as settings_lib
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
    mesh: the (data, model) mesh the model is sharded over, for the editors (None: one device).
  """

  model: Any
  tokenizer: Any
  score: Callable[..., dict]
  logits_fn: Callable[[Any], Callable]
  generate_fn: Callable[[Any], Callable] | None
  model_path: str = ""
  progress: bool = True
  mesh: Any = None


@dataclasses.dataclass(frozen=True)
class SequentialMethod:
  """start(ctx, options, seed) -> state; edit(ctx, state, records) -> state (the records applied one
  after another, in order: several per call let the editor batch them without a host sync per edit);
  fns(ctx, state) -> (post_logits_fn, post_generate_fn or None).

  Optional, for sweeps that resume after a kill: save(ctx, state, folder) writes the state into a
  new folder; load(ctx, options, seed, folder) -> state reads it back, so that editing on continues
  exactly as the uninterrupted stream would. A method without them restarts its stream on resume
  (its finished checkpoints are still not scored again)."""

  start: Callable[[CellContext, Mapping[str, Any], int], Any]
  edit: Callable[[CellContext, Any, Sequence[EditRecord]], Any]
  fns: Callable[[CellContext, Any], tuple[Callable, Callable | None]]
  save: Callable[[CellContext, Any, str], None] | None = None
  load: Callable[[CellContext, Mapping[str, Any], int, str], Any] | None = None


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


def sequential_step(options: Mapping[str, Any]) -> int | None:
  """A sweep entry's `sequential_step`: requests per edit step of a batch method run as a
  sequential stream (HORSE / MALMEN / MEND); None: not set."""
  step = options.get("sequential_step")
  if step is None:
    return None
  label = options.get("label", options.get("name"))
  if isinstance(step, bool) or not isinstance(step, int) or step < 1:
    raise UserError(f"methods.{label}.sequential_step: a positive integer, not {step!r}")
  if not (options.get("name") in BATCH and options.get("name") in SEQUENTIAL):
    raise UserError(f"methods.{label}.sequential_step: only HORSE, MALMEN and MEND edit either at "
                    f"once or as a stream ({options.get('name')} is always "
                    f"{'sequential' if options.get('name') in SEQUENTIAL else 'at once'})")
  return step


def entry_kind(options: Mapping[str, Any]) -> str:
  """How the sweep runs a method entry: "batch" (all n edits at once) or "sequential" (one stream
  per seed); a hypernetwork method with `sequential_step` is sequential."""
  kind = kind_of(options["name"])
  return "sequential" if sequential_step(options) is not None else kind


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


# ---- HORSE / MALMEN / MEND and HoReN / GRACE, through the editor protocol ----


def cell_settings(ctx: CellContext, method: str, options: Mapping[str, Any], seed: int):
  """The resolved settings of one method entry: the same resolution as `horse-jax edit` (defaults,
  the model card, then `options["settings"]` read like a --config file; the sweep's seed fills
  `editor.seed` as --seed does), so a sweep and the CLI edit with identical settings."""
  from horse_jax.editors import protocol  # noqa: PLC0415
  label = options.get("label", method)
  resolved = protocol.resolve_settings(method, ctx.model_path, ctx.model,
                                       config_tree=options.get("settings") or {},
                                       config_where=f"methods.{label}.settings")
  if resolved.given("model.dtype"):  # every method of a sweep shares the model the sweep loaded
    loaded = str(jax.tree_util.tree_leaves(ctx.model.params)[0].dtype)
    if loaded != resolved["model.dtype"]:
      raise UserError(f"methods.{label}.settings: model.dtype {resolved['model.dtype']}, but the sweep "
                      f"loads the model as {loaded} (set the sweep's `dtype`)")
  return protocol.with_seed(resolved, seed)


def effective_settings(ctx: CellContext, entry: Mapping[str, Any], seed: int) -> dict | None:
  """{key: {"value", "source"}} of a method entry, for results.json; None for methods without
  declared settings (`unedited`, other registered adapters)."""
  if entry["name"] not in settings_lib.METHODS:
    return None
  return cell_settings(ctx, entry["name"], entry, seed).effective()


# A method entry's `hypernet: init`: a freshly initialised (seeded) network, chosen explicitly.
FRESH_HYPERNET = "init"


def make_cell_editor(ctx: CellContext, method: str, options: Mapping[str, Any], seed: int,
                     codebook=None):
  """The protocol Editor of one method entry (`options["hypernet"]`: a trained hypernetwork folder,
  or `init` / absent for fresh networks; `horse-jax eval` requires one of the two explicitly;
  `codebook`: a codebook to continue, codebook methods)."""
  from horse_jax.editors import protocol  # noqa: PLC0415
  label = options.get("label", method)
  folder = options.get("hypernet")
  folder = None if folder == FRESH_HYPERNET else folder
  corpus = options.get("stats_corpus") if method in settings_lib.LOCATE else None
  return protocol.make_editor(method, ctx.model, ctx.tokenizer, cell_settings(ctx, method, options, seed),
                              hypernet=folder, codebook=codebook, where=f"methods.{label}.hypernet {folder}",
                              mesh=ctx.mesh, stats_corpus=corpus)


def _hypernet_editor(hypernet, method: str, ctx: CellContext, options, seed):
  """(cfg, state) of a method entry: the trained hypernetwork in `options["hypernet"]` when given,
  else fresh networks (kept for callers of the earlier adapter; `hypernet` is unused)."""
  del hypernet
  editor = make_cell_editor(ctx, method, options, seed)
  return editor.config, editor.init(jax.random.PRNGKey(seed))[0]


def run_hypernet(method: str, ctx: CellContext, records, options, seed) -> dict:
  editor = make_cell_editor(ctx, method, options, seed)
  state, _ = editor.edit(editor.init(jax.random.PRNGKey(seed)), records)
  edited = editor.apply(state)
  return ctx.score(records, ctx.logits_fn(edited.model),
                   ctx.generate_fn(edited.model) if ctx.generate_fn else None)


for _name in settings_lib.HYPERNET:
  register_batch(_name, functools.partial(run_hypernet, _name))


class Stream(NamedTuple):
  """A sequential stream's state: the protocol Editor, its edit state, and (hypernetwork methods
  run as a stream) the requests per edit step."""

  editor: Any
  inner: Any
  step: int | None = None


def _sequential_start(method: str, ctx: CellContext, options, seed):
  editor = make_cell_editor(ctx, method, options, seed)
  return Stream(editor, editor.init(jax.random.PRNGKey(seed)), sequential_step(options))


def _sequential_edit(ctx: CellContext, state, records: Sequence[EditRecord]):
  del ctx
  editor, inner, step = state
  records = list(records)
  # Hypernetwork methods: one `edit` call per step, each computed on the model as edited by the
  # calls before (a step never spans two calls of this function).
  for i in range(0, len(records), step or max(len(records), 1)):
    inner, _ = editor.edit(inner, records[i:i + (step or len(records))])
  return Stream(editor, inner, step)


def _sequential_fns(ctx: CellContext, state):
  edited = state.editor.apply(state.inner)
  return edited.logits, edited.generate if ctx.generate_fn else None


def _codebook_save(ctx: CellContext, state, folder: str) -> None:
  """The codebook folder (`codebook.persist`), with its capacity: a stream resumed from it runs the
  same compiled programs on the same buffer shapes as the uninterrupted one."""
  from horse_jax.editors.codebook import persist  # noqa: PLC0415
  del ctx
  persist.save(folder, state.inner, state.editor.config, extra={"capacity": state.inner.capacity})


def _codebook_load(method: str, ctx: CellContext, options, seed, folder: str):
  from horse_jax.editors.codebook import persist  # noqa: PLC0415
  _, extra = persist.load_settings(folder)
  book, _ = persist.load(folder, capacity=int(extra["capacity"]))
  editor = make_cell_editor(ctx, method, options, seed, codebook=book)
  return Stream(editor, editor.init(jax.random.PRNGKey(seed)))


def _state_save(ctx: CellContext, state, folder: str) -> None:
  """The edit state as a pytree (`horse_jax.io.save_pytree`): UltraEdit's statistics and shifts,
  ROME/MEMIT/AlphaEdit's shifts and cache, DEFER's gate and adapter, WISE's memories and mask
  generator, a hypernetwork stream's networks and shifts. The editor itself (settings, C and
  projectors, templates) is rebuilt from the sweep entry on load."""
  from horse_jax.io import save_pytree  # noqa: PLC0415
  del ctx
  save_pytree(folder, state.inner)


def _state_load(method: str, ctx: CellContext, options, seed, folder: str):
  from horse_jax.io import load_pytree  # noqa: PLC0415
  stream = _sequential_start(method, ctx, options, seed)
  like = stream.inner
  if method in settings_lib.HYPERNET and like.shifts is None:  # shifts exist once a step was made
    from horse_jax.models import names  # noqa: PLC0415
    like = like._replace(shifts={m: names.get_kernel(ctx.model.params, m)
                                 for m in stream.editor.config.modules})
  return stream._replace(inner=load_pytree(folder, like))


# Every sequential method saves its state at each checkpoint, so a killed sweep resumes its streams.
# HoReN / GRACE edit one request after another into a codebook (saved as a codebook folder).
for _name in settings_lib.CODEBOOK:
  register_sequential(_name, SequentialMethod(
      functools.partial(_sequential_start, _name), _sequential_edit, _sequential_fns, _codebook_save,
      functools.partial(_codebook_load, _name)))
# UltraEdit edits steps of `editor.batch_size` requests (a sweep giving it fewer records at a time
# makes shorter steps). ROME / MEMIT / AlphaEdit run one request per step as in the HoReN reference
# (AlphaEdit's cache of past keys carries over); an entry's `stats_corpus` names the corpus of C
# (default the world's pre-training text). DEFER and WISE wrap one module and edit one record at a
# time. HORSE / MALMEN / MEND are batch methods, and sequential (an entry with `sequential_step`)
# as the HoReN paper runs its MEND baseline: steps of that many requests applied one after another.
for _name in (settings_lib.ULTRAEDIT + settings_lib.LOCATE + settings_lib.WRAPPED
              + settings_lib.HYPERNET):
  register_sequential(_name, SequentialMethod(
      functools.partial(_sequential_start, _name), _sequential_edit, _sequential_fns, _state_save,
      functools.partial(_state_load, _name)))
