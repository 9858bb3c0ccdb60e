"""One editor protocol for both families, in the style of optax: a NamedTuple of pure functions.

  editor = make_editor("horse", model, tokenizer, settings)    # or malmen, mend, horen, grace, ultraedit
  state = editor.init(jax.random.PRNGKey(0))
  state, info = editor.edit(state, records)                     # EditRecords; call again to add more
  edited = editor.apply(state)                                  # Edited, the same for every method:
  edited.model                                                  #   the edited model (edit applied)
  edited.logits(batch)                                          #   EditBatch -> [B, T, V]
  edited.generate(input_ids, attention_mask, max_new_tokens)    #   greedy tokens [B, N]
  edited.state, edited.metrics, edited.base                     #   edit state, counts, unedited model

HORSE/MALMEN/MEND edit all the records of one `edit` call at once (their shifts are added to the
kernels; a second call edits the already edited model and adds its shifts); HoReN/GRACE edit them
one after another into the codebook; UltraEdit edits them in steps of `editor.batch_size` requests,
each step's weight shifts computed on the model as edited by the steps before. The state is explicit and the functions close over nothing
that changes: the same state gives the same edited model. One exception to reuse: a codebook state
passed to `edit` is consumed (its device buffers are donated to the jitted edit step, so a codebook
of 10^5 rows is never copied), and so is an UltraEdit state (statistics and shifts); keep the
returned state, as with `codebook.apply_edit`. Sweeps
(`horse_jax.eval.methods`), the CLI and other projects drive every method through this protocol.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from horse_jax import settings as settings_lib
from horse_jax.errors import UserError


class Edited(NamedTuple):
  """The result of editing, one type for every method.

  Attributes:
    model: the edited model, with the edit applied: a Model with edited weights (hypernetwork
      methods) or a `codebook.EditedModel` (base model + codebook hook; codebook methods). Both
      give `.logits` / `.generate` through the fields below.
    logits: EditBatch -> logits [B, T, V] of the edited model.
    generate: (left-padded input_ids, attention_mask, max_new_tokens) -> greedy tokens [B, N].
    state: the edit state `apply` was given (pass it to `edit` to add more edits).
    metrics: {"method", "n_edits": edits applied so far, ...}: hypernetwork methods add
      "edit_modules"; codebook methods "rows" (keys in the codebook) and "capacity".
    base: the unedited model (never changed by editing).
  """

  model: Any
  logits: Callable[[Any], jax.Array]
  generate: Callable[[Any, Any, int], jax.Array]
  state: Any
  metrics: dict
  base: Any


class HypernetEditState(NamedTuple):
  """Edit state of the hypernetwork methods.

  Attributes:
    nets: the hypernetwork state (networks and normalizers; a trained one, or fresh).
    shifts: {module: [d_in, d_out] kernel shift} accumulated over `edit` calls (None: no edit yet).
    n_edits: records edited so far.
  """

  nets: Any
  shifts: dict | None
  n_edits: int = 0


class Editor(NamedTuple):
  """Any editing method as pure functions over an explicit state.

  Attributes:
    method: horse | malmen | mend | horen | grace | ultraedit.
    kind: "at_once" (hypernetwork methods) or "sequential" (codebook methods, UltraEdit).
    settings: the resolved settings (`horse_jax.settings.Resolved`, with provenance).
    config: the static editor config (`HypernetConfig` or `CodebookSettings`).
    init: key -> state.
    edit: (state, records) -> (state, info); info is a list of per-edit dicts (codebook methods) or
      {} (hypernetwork methods, UltraEdit).
    apply: state -> Edited (the same result type for every method).
  """

  method: str
  kind: str
  settings: settings_lib.Resolved
  config: Any
  init: Callable[[jax.Array], Any]
  edit: Callable[[Any, Sequence[Any]], tuple[Any, Any]]
  apply: Callable[[Any], Edited]


@jax.jit
def _forward(model, input_ids, attention_mask):
  from horse_jax.models import apply  # noqa: PLC0415
  return apply(model, input_ids, attention_mask)


def model_logits(model) -> Callable:
  """EditBatch -> logits of a plain Model (one compile per shape, shared by equal configs)."""
  return lambda batch: _forward(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))


def model_generate(model) -> Callable:
  """(input_ids, attention_mask, max_new_tokens) -> greedy tokens of a plain Model."""
  from horse_jax.models.generate import generate  # noqa: PLC0415
  return lambda ids, mask, n: generate(model, ids, mask, n)


def resolve_settings(method: str, model_path, model, **kw) -> settings_lib.Resolved:
  """The settings of `method` for the checkpoint at `model_path`: the one resolution the CLI and
  sweeps share (defaults <- model card <- config <- --set; see `horse_jax.settings.resolve`).

  Args:
    method: the editing method.
    model_path: the checkpoint folder (its card is found by folder name, HF id or alias).
    model: the Model, or just its ModelConfig.
    **kw: `horse_jax.settings.resolve` keywords (configs, config_tree, overrides, codebook).
  """
  return settings_lib.resolve_for_model(method, model_path, getattr(model, "config", model), **kw)


def with_seed(resolved: settings_lib.Resolved, seed: int) -> settings_lib.Resolved:
  """The run's seed as `editor.seed` (codebook methods), unless a config or --set chose one."""
  if "editor.seed" in resolved.values and resolved.sources["editor.seed"] in ("default", "card"):
    resolved.values["editor.seed"] = int(seed)
    resolved.sources["editor.seed"] = "run"
  return resolved


def make_editor(method: str, model, tokenizer, settings: settings_lib.Resolved, *,
                hypernet: str | None = None, codebook: Any = None, progress: bool = False,
                where: str | None = None, mesh=None, stats_corpus: str | None = None) -> Editor:
  """The Editor of `method` for `model`.

  Args:
    method: horse | malmen | mend | horen | grace.
    model: the unedited Model.
    tokenizer: its tokenizer (records are tokenized inside `edit`).
    settings: resolved settings of `method` (`resolve_settings`).
    hypernet: a trained hypernetwork folder (hypernetwork methods; fresh networks when None).
    codebook: a Codebook to continue (codebook methods; an empty one when None).
    progress: codebook methods: a progress bar over the edits of each `edit` call (a hypernetwork
      edit is one compiled program, with no steps to show).
    where: what to name in errors about `hypernet` (default the folder).
    mesh: optional (`data`, `model`) mesh: the codebook's shardings, or the hypernetwork program's
      (cached rows over `data`, shifts by column over `model`); ROME/MEMIT/AlphaEdit keep C, their
      shifts and cache replicated over it.
    stats_corpus: ROME/MEMIT/AlphaEdit: the corpus of the second-moment statistics C (a text/JSON/
      JSONL file or a saved `datasets` folder; None: the world's pre-training text).

  Returns:
    The Editor.
  """
  if settings.method != method:
    raise UserError(f"settings resolved for {settings.method}, not {method}")
  if method in settings_lib.HYPERNET:
    return _hypernet_editor(method, model, tokenizer, settings, hypernet, where, mesh)
  if method in settings_lib.CODEBOOK:
    return _codebook_editor(method, model, tokenizer, settings, codebook, progress, mesh)
  if method in settings_lib.ULTRAEDIT:
    return _ultraedit_editor(method, model, tokenizer, settings, mesh)
  if method in settings_lib.LOCATE:
    return _locate_editor(method, model, tokenizer, settings, stats_corpus, progress, mesh)
  if method == "defer":
    return _defer_editor(model, tokenizer, settings, progress, mesh)
  if method == "wise":
    return _wise_editor(model, tokenizer, settings, progress, mesh)
  raise UserError(f"unknown method {method!r} (one of {', '.join(settings_lib.METHODS)})")


def _hypernet_editor(method, model, tokenizer, settings, folder, where, mesh=None) -> Editor:
  from horse_jax.editors import hypernet  # noqa: PLC0415
  from horse_jax.editors.hypernet.checkpoint import load_for_editing  # noqa: PLC0415
  trained = None
  if folder:
    # The LM mini-batch stays the trained one unless the user chose data.batch_size.
    lm_batch = settings["data.batch_size"] if settings.given("data.batch_size") else None
    cfg, trained = load_for_editing(folder, method, model, settings["editor.batch_size"], lm_batch,
                                    where or f"--hypernet {folder}")
  else:
    cfg = hypernet.from_settings(method, settings, model)
  max_length = settings["data.max_length"]

  def init(key):
    nets = trained if trained is not None else hypernet.init(cfg, key)
    return HypernetEditState(nets, None, 0)

  def edit(state, records):
    nets, shifts, done = state
    records = list(records)
    base = model if shifts is None else hypernet.apply(model, shifts)
    batches = hypernet.edit_batches(tokenizer, records, cfg.lm_batch, max_length)
    new, nets = hypernet.edit(nets, base, cfg, batches, mesh=mesh)
    if shifts is not None:
      new = {k: new[k] + shifts[k] for k in new}
    return HypernetEditState(nets, new, done + len(records)), {}

  def apply(state):
    state = state if isinstance(state, HypernetEditState) else HypernetEditState(*state)
    edited = model if state.shifts is None else hypernet.apply(model, state.shifts)
    metrics = {"method": method, "n_edits": int(state.n_edits), "edit_modules": list(cfg.modules)}
    return Edited(edited, model_logits(edited), model_generate(edited), state, metrics, model)

  return Editor(method, "at_once", settings, cfg, init, edit, apply)


def _codebook_editor(method, model, tokenizer, settings, book0, progress, mesh) -> Editor:
  from horse_jax.data.tokenize import concat_batches, padding_id  # noqa: PLC0415
  from horse_jax.data.unke import tokenize_record  # noqa: PLC0415
  from horse_jax.editors.codebook import edit as edit_lib, infer  # noqa: PLC0415
  from horse_jax.editors.codebook import settings as cb_settings, state as state_lib  # noqa: PLC0415
  from horse_jax.models import names  # noqa: PLC0415
  cfg = cb_settings.from_resolved(settings, model.config)
  names.check_module_names(model.config, (cfg.layer,))
  d_in, d_out = (int(n) for n in names.get_kernel(model.params, cfg.layer).shape)
  if book0 is not None and (book0.keys.shape[1] != d_in or book0.values.shape[1] != d_out):
    raise UserError(f"codebook: keys/values {book0.keys.shape[1]}/{book0.values.shape[1]} wide, "
                    f"but {cfg.layer} is {d_in} -> {d_out}")
  max_length = settings["data.max_length"] or model.config.max_position_embeddings

  def init(key):
    del key  # values are initialised from editor.seed folded with the edit counter
    return book0 if book0 is not None else state_lib.init(cfg, d_in, d_out)

  def edit(book, records):
    # UnKE records: chat prompts, long targets.
    if not records:
      return book, []
    batches = [tokenize_record(tokenizer, record, max_length) for record in records]
    # One padded length for the whole call (the longest record's bucket): the requests stay in
    # order and run as blocks of `editor.edit_block` edits without a host sync per edit; padding
    # changes no result (masked), and one length means one compiled program per call shape.
    return edit_lib.apply_edits(model, book, concat_batches(batches, padding_id(tokenizer)), cfg,
                                progress=progress, mesh=mesh)

  def apply(book):
    from horse_jax.editors.codebook.persist import EditedModel  # noqa: PLC0415
    metrics = {"method": method, "n_edits": int(book.n_edits), "rows": int(book.count),
               "capacity": int(book.capacity)}
    return Edited(EditedModel(model, book, cfg), infer.logits_fn(model, book, cfg),
                  infer.generate_fn(model, book, cfg), book, metrics, model)

  return Editor(method, "sequential", settings, cfg, init, edit, apply)


def _ultraedit_editor(method, model, tokenizer, settings, mesh) -> Editor:
  from horse_jax.editors.hypernet import packing  # noqa: PLC0415
  from horse_jax.editors.ultraedit import editor as ue  # noqa: PLC0415
  cfg = ue.config_for(settings, model)
  typed = settings.typed.editor
  max_length = settings["data.max_length"] or model.config.max_position_embeddings
  # One packer for the editor's life: packed shapes only grow, so a run compiles its step a few times.
  packer = packing.Packer(cfg.chunk, 8 if mesh is None else max(8, mesh.shape["data"]))

  def init(key):
    del key  # nothing random
    return ue.init(cfg, mesh)

  def edit(state, records):
    state = state if isinstance(state, ue.UltraEditState) else ue.UltraEditState(*state)
    return ue.edit(state, model, tokenizer, list(records), typed, cfg, mesh, max_length, packer), {}

  def apply(state):
    state = state if isinstance(state, ue.UltraEditState) else ue.UltraEditState(*state)
    edited = ue.apply(model, state)
    metrics = {"method": method, "n_edits": int(state.n_edits), "edit_modules": list(cfg.modules)}
    return Edited(edited, model_logits(edited), model_generate(edited), state, metrics, model)

  return Editor(method, "sequential", settings, cfg, init, edit, apply)


def _locate_editor(method, model, tokenizer, settings, stats_corpus, progress, mesh) -> Editor:
  from horse_jax.editors.locate import editor as locate, stats  # noqa: PLC0415
  cfg = settings.typed.editor
  ctx_args = dict(max_length=settings["data.max_length"], mesh=mesh)
  covs = {}
  modules = locate.modules_of(cfg, model.config)
  if locate.needs_covariance(cfg):
    texts = stats.read_corpus(stats_corpus) if stats_corpus else stats.world_corpus()
    covs = stats.layer_moments(model, tokenizer, texts[:cfg.mom2_n_samples], modules,
                               stats_dir=cfg.stats_dir or None,
                               corpus_name=stats_corpus or "the world's pre-training text",
                               progress=progress)
  ctx = locate.prepare(method, model, tokenizer, cfg, covs, **ctx_args)

  def init(key):
    del key  # deterministic: no random initialisation
    return locate.init_state(ctx)

  def edit(state, records):
    return locate.edit(ctx, state, list(records), start_index=state.n_edits)

  def apply(state):
    state = state if isinstance(state, locate.LocateState) else locate.LocateState(*state)
    edited = locate.apply_shifts(model, state.shifts)
    metrics = {"method": method, "n_edits": int(state.n_edits), "edit_modules": list(ctx.modules)}
    if ctx.null_dims:
      metrics["null_space_dims"] = dict(ctx.null_dims)
    return Edited(edited, model_logits(edited), model_generate(edited), state, metrics, model)

  return Editor(method, "sequential", settings, ctx, init, edit, apply)


def _tokenized(tokenizer, records, max_length):
  """One right-padded batch of the records, in order (UnKE records as chat prompts)."""
  from horse_jax.data.tokenize import concat_batches, padding_id  # noqa: PLC0415
  from horse_jax.data.unke import tokenize_record  # noqa: PLC0415
  return concat_batches([tokenize_record(tokenizer, r, max_length) for r in records],
                        padding_id(tokenizer))


def _defer_editor(model, tokenizer, settings, progress, mesh) -> Editor:
  """DEFER: a gate and an adapter at one module, edited one record at a time (`editors.defer`)."""
  from horse_jax.editors import defer  # noqa: PLC0415
  cfg = defer.from_resolved(settings, model.config)
  d_in, d_out = defer.check_layer(model, cfg)
  max_length = settings["data.max_length"] or model.config.max_position_embeddings

  def init(key):
    del key  # the arrays are initialised from editor.seed
    sharding = None
    if mesh is not None:  # the adapter's matrix is laid out as the wrapped kernel is
      from horse_jax.models import names  # noqa: PLC0415
      sharding = getattr(names.get_kernel(model.params, cfg.layer), "sharding", None)
    return defer.init(cfg, d_in, d_out, sharding)

  def edit(state, records):
    records = list(records)
    if not records:
      return state, []
    return defer.apply_edits(model, state, _tokenized(tokenizer, records, max_length), cfg,
                             progress=progress)

  def apply(state):
    metrics = {"method": "defer", "n_edits": int(state.n_edits), "layer": cfg.layer}
    edited = defer.DeferModel(model, state, cfg)
    return Edited(edited, edited.logits, edited.generate, state, metrics, model)

  return Editor("defer", "sequential", settings, cfg, init, edit, apply)


def _wise_editor(model, tokenizer, settings, progress, mesh) -> Editor:
  """WISE: a side memory of one module, routed by activation (`editors.wise`)."""
  from horse_jax.editors import wise  # noqa: PLC0415
  from horse_jax.models import names  # noqa: PLC0415
  cfg = wise.from_resolved(settings, model.config)
  names.check_module_names(model.config, (cfg.layer,))
  kernel = names.get_kernel(model.params, cfg.layer)
  templates = list(cfg.context_templates or wise.context_templates(model, tokenizer))

  def init(key):
    del key  # masks come from editor.seed
    state = wise.init(kernel, cfg)
    if mesh is not None and getattr(kernel, "sharding", None) is not None:
      # The side memory and its mask are laid out as the wrapped kernel.
      state = state._replace(side=jax.device_put(state.side, kernel.sharding),
                             mask=jax.device_put(state.mask, kernel.sharding))
    return state

  def edit(state, records):
    return wise.apply_edits(model, state, tokenizer, list(records), templates, cfg,
                            progress=progress)

  def apply(state):
    metrics = {"method": "wise", "n_edits": int(state.n_edits), "layer": cfg.layer,
               "memories": int(state.memories.shape[0]), "merges": int(state.merges),
               "context_templates": templates}
    edited = wise.WiseModel(model, state, cfg)
    return Edited(edited, edited.logits, edited.generate, state, metrics, model)

  return Editor("wise", "sequential", settings, cfg, init, edit, apply)
