"""Memory and FLOPs of an editing run, per device, without allocating a single weight.

`plan(...)` lowers and compiles the editors' jitted programs on `jax.ShapeDtypeStruct` inputs laid
out on a (data, model) mesh (weights by the tensor-parallel rules, optionally FSDP; batches and
cached rows over `data`), then reads XLA's own numbers: `compiled.memory_analysis()` (arguments,
outputs, temporaries) and `compiled.cost_analysis()` (FLOPs), both per device. Only config.json is
needed. The stages are the programs the editors run:

  load        the sharded weights (no program: bytes from the shardings)
  edit        HORSE / MALMEN / MEND: `hypernet.program.edit_program`, the whole edit of N edits
              (cache + normalizer + solves), lowered from abstract `packing.Packed` sets
  meta-step   HORSE / MALMEN / MEND: `hypernet.program.train_program`, one whole meta-training step
              that computes its cache
  memo-fill   `hypernet.program.fill_memo_program`: one call of `memo.build` (FILL_RECORDS training
              records) into a memo as large as `editor.memo_cache_mb` allows
  meta-step-memo  `hypernet.program.train_program_memo`: the step with its cache gathered from that
              memo
  edit        HoReN / GRACE: one block of `editor.edit_block` edits into an N-entry codebook
  inference   HoReN / GRACE: the edited LM's logits on `eval.batch_size` prompts read through that
              codebook (`codebook.infer`: what scoring and serving run)
  edit-step   UltraEdit: `ultraedit.editor.edit_step`, one step of `editor.batch_size` requests
              (keys / value gradients, statistics, solves; N edits run N / batch_size of them)
  edit        DEFER / WISE: one edit (the program run once per record; `plan_program` of
              `horse_jax.editors.defer` / `horse_jax.editors.wise`)
  statistics, target, solve   ROME / MEMIT / AlphaEdit (`horse_jax.editors.locate.plan`): one
              corpus batch of the second-moment statistics, one request's target optimisation, one
              module's closed form; each with the run's C and shifts as `resident`

`horse-jax train` runs `memo-fill` + `meta-step-memo` when the memo of its training records fits
`editor.memo_cache_mb` (replicated, per device), else `meta-step`; the plan does not know the
training set, so it compiles the memo programs whenever the budget holds one step's rows, with the
largest memo the budget allows. A program that cannot be lowered or compiled fails the plan with a
`UserError` naming it.

A stage's peak is arguments + outputs + temporaries - donated (aliased) bytes, plus `resident`: what
the caller keeps alive across the stage without passing it (e.g. the Adam state during an edit).
`peak_bytes_per_device` is the largest stage peak. Each compiled stage also lists its collectives
(`horse_jax.collectives`, read from the compiled HLO: the largest one and the total bytes per
device of one run, loop trip counts applied).

Compiler: the mesh's devices compile the programs. When the host has fewer devices than the mesh
(`meshes.planning_mesh`), that many CPU devices are forced and XLA's CPU compiler stands in for the
target's: the SPMD partitioning (shardings, collectives) is XLA's own on every platform, but
layouts, fusion, buffer reuse and the collectives' combining and async scheduling are the CPU
backend's, so the bytes differ a little from TPU/GPU. `result["compiler"]` says which it was.

Token shapes: one padded prompt + answer of `seq_len` tokens and `answer_tokens` cached rows per
edit, given, or measured on a data file (`data_token_shapes`: the records `edit` would read, with
the model's tokenizer), or the defaults 32 and 3 (ZsRE's mean).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.collectives import collectives
from horse_jax.errors import UserError
from horse_jax.models.hf_map import abstract_params
from horse_jax.settings import CODEBOOK, HYPERNET, LOCATE, ULTRAEDIT, WRAPPED

GIB = 1024 ** 3
# Per-chip memory (GiB) of the accelerators the plan compares against.
CHIPS: tuple[tuple[str, float], ...] = (("TPU v5e", 16), ("TPU v4", 32), ("TPU v5p", 95),
                                        ("H100", 80), ("H200", 141))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SEQ_LEN, ANSWER_TOKENS = 32, 3  # token shapes without --data: a short edit, ZsRE's mean answer


@dataclasses.dataclass
class Stage:
  """Per-device numbers of one compiled stage (bytes; FLOPs as XLA counts them)."""

  name: str
  what: str
  weights: int = 0
  arguments: int = 0
  outputs: int = 0
  temporaries: int = 0
  aliased: int = 0
  resident: int = 0
  flops: float = 0.0
  collective_bytes: int = 0  # per device, one run of the program (`horse_jax.collectives`)
  collective_ops: int = 0  # collective ops in the program text
  collective_bytes_by_kind: dict[str, int] | None = None  # {kind: bytes}, per device, one run
  largest_collective: dict[str, Any] | None = None  # kind, shape, bytes, count, name
  heaviest_collectives: list[dict[str, Any]] | None = None  # (kind, shape) groups moving the most bytes
  unknown_trip_loops: int = 0  # loops with collectives whose trip count XLA did not record

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased + self.resident

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "peak": self.peak}


def _with_sharding(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _replicated(tree, mesh):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), tree)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _compile(fn: Callable, *args, **kwargs):
  """`fn` lowered and compiled for the abstract arguments; a UserError naming `fn` if it cannot be."""
  try:
    return fn.lower(*args, **kwargs).compile()
  except Exception as err:  # noqa: BLE001  (JAX and XLA report such failures as many types)
    first = (str(err).splitlines() or [""])[0][:300]
    raise UserError(f"plan: program {getattr(fn, '__name__', fn)} cannot be lowered and compiled "
                    f"({type(err).__name__}: {first})") from None


def _measure(stage: Stage, compiled) -> Stage:
  mem = compiled.memory_analysis()
  if mem is not None:
    stage.arguments = int(mem.argument_size_in_bytes)
    stage.outputs = int(mem.output_size_in_bytes)
    stage.temporaries = int(mem.temp_size_in_bytes)
    stage.aliased = int(mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  stage.flops = float((cost or {}).get("flops", 0.0))
  text = compiled.as_text() if hasattr(compiled, "as_text") else None
  if text:
    found = collectives(text)
    stage.collective_bytes = found.total_bytes
    stage.collective_ops = len(found.ops)
    stage.collective_bytes_by_kind = found.by_kind()
    stage.largest_collective = found.largest.to_dict() if found.largest else None
    stage.heaviest_collectives = found.heaviest()
    stage.unknown_trip_loops = found.unknown_trip_loops
  return stage


def _settings(method: str, model, model_path: str, overrides) -> dict[str, Any]:
  # The resolution `horse-jax edit` uses (declared defaults <- model card <- --set).
  from horse_jax.editors.protocol import resolve_settings
  tree = resolve_settings(method, model_path, model, overrides=list(overrides)).tree()
  if not tree["model"].get("edit_modules"):
    from horse_jax.models.names import default_edit_modules
    tree["model"]["edit_modules"] = default_edit_modules(model.config)
  return tree


def _card(model_path: str, config) -> dict[str, Any]:
  try:
    from horse_jax.models.cards import card_for
    return dict(card_for(model_path, config) or {})
  except (ModuleNotFoundError, UserError):
    return {}


def _put_abstract(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
  """A host array as `program.put_array` places it: its leading dim split over `data` when it
  divides (and is not 1), else replicated."""
  spec = P("data") if shape[0] > 1 and shape[0] % mesh.shape["data"] == 0 else P()
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def packed_abstract(n_seqs: int, seq_len: int, answer_tokens: int, cached_per_seq: int,
                    lm_batch: int, chunk: int, mesh, with_rows: bool):
  """ShapeDtypeStructs of a `packing.Packed` set of n_seqs sequences of seq_len tokens (each with
  answer_tokens labels and cached_per_seq cached rows), with the shapes and shardings
  `packing.pack` + `program.put` give it.

  Returns:
    (the Packed set, its number of cached rows).
  """
  from horse_jax.data.tokenize import bucket_length
  from horse_jax.editors.hypernet import packing
  multiple = max(8, mesh.shape["data"])
  width = max(32, 2 * bucket_length(seq_len, minimum=8))
  per_row = max(width // seq_len, 1)
  w = packing.chunked_rows(packing.rows_bucket(-(-n_seqs // per_row), multiple), width, multiple)
  n_chunks = packing.lm_chunks(w, width)  # labels laid out chunk by chunk, evenly spread
  n_labels = n_chunks * packing.rows_bucket(-(-n_seqs * answer_tokens // n_chunks), multiple)
  total = packing.padded_rows(n_seqs * cached_per_seq, chunk)[0] if with_rows else multiple
  n_batches = -(-n_seqs // lm_batch)
  i32, f32 = jnp.int32, jnp.float32
  shapes = ((w, width), (w, width), (w, width), (n_labels,), (n_labels,), (n_labels,), (total,),
            (total,), (total,), (n_batches,))
  dtypes = (i32, i32, i32, i32, i32, f32, i32, f32, i32, i32)
  return packing.Packed(*(_put_abstract(s, d, mesh) for s, d in zip(shapes, dtypes))), total


def hypernet_stages(model, model_path: str, method: str, n_edits: int, mesh, overrides,
                    answer_tokens: int, seq_len: int) -> tuple[list[Stage], dict[str, Any]]:
  """HORSE / MALMEN / MEND as the programs the editors run (`hypernet.program`): the whole edit and
  one whole meta-training step; when a memo of `editor.memo_cache_mb` holds one step's rows, also
  the memo's fill and the meta-training step that reads it (see the module docstring)."""
  from horse_jax.editors import hypernet
  from horse_jax.editors.hypernet import memo as memo_lib
  from horse_jax.editors.hypernet import program

  settings = _settings(method, model, model_path, overrides)
  cfg = hypernet.from_settings(method, settings, model)
  weights = _shard_bytes(model.params)
  state = _replicated(jax.eval_shape(functools.partial(hypernet.init, cfg), jax.random.PRNGKey(0)), mesh)
  cached_per_seq = answer_tokens if cfg.token == "ans" else seq_len
  packed = functools.partial(packed_abstract, seq_len=seq_len, answer_tokens=answer_tokens,
                             cached_per_seq=cached_per_seq, lm_batch=cfg.lm_batch, chunk=cfg.chunk,
                             mesh=mesh)
  edits, total = packed(n_edits, with_rows=True)
  other, _ = packed(n_edits, with_rows=False)
  stages = []
  st = Stage("edit", f"cache + solves of {n_edits} edits ({total} cached rows), one program",
             weights=weights, resident=_shard_bytes(state.opt_state))
  compiled = _compile(program.edit_program, state.nets, state.norms, model, edits, cfg=cfg, mesh=mesh)
  stages.append(_measure(st, compiled))
  st = Stage("meta-step", f"one meta-training step on {n_edits} edits (+ rephrases, locality), one program",
             weights=weights)
  compiled = _compile(program.train_program, state, model, edits, other, other, cfg=cfg, mesh=mesh)
  stages.append(_measure(st, compiled))
  info = {"modules": list(cfg.modules), "rank": cfg.rank, "lm_batch": cfg.lm_batch,
          "cached_rows": total, "answer_tokens_per_edit": answer_tokens, "seq_len": seq_len,
          "hypernet_bytes": _shard_bytes(state.nets) + _shard_bytes(state.norms),
          "adam_bytes": _shard_bytes(state.opt_state)}
  budget_mb = float(settings["editor"]["memo_cache_mb"])
  slots = memo_lib.budget_rows(cfg, budget_mb) if budget_mb > 0 else -1
  if slots < n_edits * cached_per_seq:  # no memo can serve a step: `train` recomputes every cache
    return stages, info
  f32, i32 = jnp.float32, jnp.int32
  memo = _replicated(tuple({m: jax.ShapeDtypeStruct((slots + 1, shape[i]), f32)
                            for m, shape in zip(cfg.modules, cfg.shapes)} for i in (0, 1)), mesh)
  n_fill = min(memo_lib.FILL_RECORDS, slots // cached_per_seq)
  fill, fill_rows = packed(n_fill, with_rows=True)
  st = Stage("memo-fill", f"keys + value grads of {n_fill} training records into a memo of "
             f"{slots} rows (the most editor.memo_cache_mb={budget_mb:g} holds), one program",
             weights=weights, resident=_shard_bytes(state))
  compiled = _compile(program.fill_memo_program, memo, model, fill,
                      _put_abstract((fill_rows,), i32, mesh), cfg=cfg, mesh=mesh)
  stages.append(_measure(st, compiled))
  rows = memo_lib.MemoRows(*(_put_abstract(shape, dt, mesh) for shape, dt in (
      ((total,), i32), ((total,), f32), ((total,), f32), ((total,), i32),
      ((-(-n_edits // cfg.lm_batch),), i32))))
  st = Stage("meta-step-memo", f"one meta-training step on {n_edits} edits, cache gathered from "
             "that memo (what `train` runs when the memo fits), one program", weights=weights)
  compiled = _compile(program.train_program_memo, state, model, memo, rows, other, other, cfg=cfg,
                      mesh=mesh)
  stages.append(_measure(st, compiled))
  info["memo_rows"] = slots
  return stages, info


def codebook_stages(model, model_path: str, method: str, n_edits: int, mesh, overrides,
                    seq_len: int) -> tuple[list[Stage], dict[str, Any]]:
  """One block of `editor.edit_block` HoReN / GRACE edits (the program sequential editing runs)
  into a codebook of `n_edits` rows."""
  from horse_jax.editors.codebook import edit as edit_lib
  from horse_jax.editors.codebook import infer
  from horse_jax.editors.codebook import settings as settings_lib
  from horse_jax.editors.codebook import state as state_lib
  from horse_jax.editors.protocol import resolve_settings
  from horse_jax.models import names

  # The resolution `horse-jax edit` uses (declared defaults <- model card <- --set).
  settings = settings_lib.from_resolved(
      resolve_settings(method, model_path, model, overrides=list(overrides)), model.config)
  d_in, d_out = (int(n) for n in names.get_kernel(model.params, settings.layer).shape)
  capacity = state_lib.mesh_capacity(
      state_lib.planned_capacity(int(n_edits) + 1, settings.initial_capacity), mesh)
  settings = dataclasses.replace(settings, initial_capacity=capacity)
  book = jax.eval_shape(lambda: state_lib.init(settings, d_in, d_out))
  book = _with_sharding(book, state_lib.shardings(book, mesh))
  rep = NamedSharding(mesh, P())
  b = settings.edit_block
  tok = jax.ShapeDtypeStruct((b, seq_len), jnp.int32, sharding=rep)
  one = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep)
  label = jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=rep)
  valid = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=rep)
  weights = _shard_bytes(model.params)
  what = f"one {method} edit" if b == 1 else f"a block of {b} {method} edits (editor.edit_block)"
  st = Stage("edit", f"{what} into a {capacity}-row codebook ({seq_len} tokens)", weights=weights)
  compiled = _compile(edit_lib._edit_block_jit, model, book, tok, tok, tok, one, label, valid,
                      settings_lib.hyper_of(settings), settings=settings_lib.jit_key(settings),
                      n_label=8, mesh=mesh)
  edit_stage = _measure(st, compiled)
  # Scoring and serving run the LM with the codebook read at each prompt's last token: one batch of
  # eval.batch_size right-padded prompts (the program `horse_jax.eval.scoring` runs per batch).
  n_eval = int(resolve_settings(method, model_path, model, overrides=list(overrides))["eval.batch_size"])
  ids = jax.ShapeDtypeStruct((n_eval, seq_len), jnp.int32, sharding=rep)
  lens = jax.ShapeDtypeStruct((n_eval,), jnp.int32, sharding=rep)
  inf = Stage("inference", f"logits of {n_eval} prompts (eval.batch_size) read through the codebook",
              weights=weights)
  compiled = _compile(infer._edited_logits, model, book, ids, ids, lens, settings_lib.hyper_of(settings),
                      settings=settings_lib.jit_key(settings), mesh=mesh)
  info = {"layer": settings.layer, "codebook_rows": capacity, "codebook_bytes_per_device": _shard_bytes(book),
          "seq_len": seq_len, "edit_block": b, "eval_batch_size": n_eval}
  return [edit_stage, _measure(inf, compiled)], info


def ultraedit_stages(model, model_path: str, method: str, n_edits: int, mesh, overrides,
                     seq_len: int) -> tuple[list[Stage], dict[str, Any]]:
  """One UltraEdit step of `editor.batch_size` requests (the program every step runs; the
  statistics and the accumulated shifts are its donated state)."""
  from horse_jax.editors.protocol import resolve_settings
  from horse_jax.editors.ultraedit import editor as ue

  resolved = resolve_settings(method, model_path, model, overrides=list(overrides))
  cfg = ue.config_for(resolved, model)
  ed = resolved.typed.editor
  state = jax.eval_shape(lambda: ue.init(cfg))
  deltas = {m: jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=NamedSharding(
      mesh, P(None, "model") if d.shape[1] % mesh.shape["model"] == 0 else P()))
      for m, d in state.deltas.items()}
  norms = _replicated(state.norms, mesh)
  n_step = min(ed.batch_size, n_edits)
  packed, total = packed_abstract(n_step, seq_len, answer_tokens=seq_len // 2,
                                  cached_per_seq=seq_len, lm_batch=ed.batch_size_once,
                                  chunk=cfg.chunk, mesh=mesh, with_rows=True)
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  st = Stage("edit-step", f"one step of {n_step} requests ({total} cached rows); {n_edits} edits "
             f"run {-(-n_edits // n_step)} such steps", weights=_shard_bytes(model.params))
  compiled = _compile(ue.edit_step, model, deltas, norms, packed, lr, cfg=cfg, mesh=mesh)
  info = {"modules": list(cfg.modules), "batch_size": ed.batch_size, "cached_rows": total,
          "seq_len": seq_len, "deltas_bytes_per_device": _shard_bytes(deltas)}
  return [_measure(st, compiled)], info


def wrapped_stages(model, model_path: str, method: str, n_edits: int, mesh, overrides,
                   seq_len: int) -> tuple[list[Stage], dict[str, Any]]:
  """One DEFER / WISE edit, compiled for abstract inputs (the editor module's `plan_program`)."""
  from horse_jax.editors.protocol import resolve_settings
  if method == "defer":
    from horse_jax.editors import defer as module
  else:
    from horse_jax.editors.wise import plan as module
  resolved = resolve_settings(method, model_path, model, overrides=list(overrides))
  fn, args, kwargs, what, info = module.plan_program(model, resolved, mesh, seq_len, n_edits)
  st = Stage("edit", what, weights=_shard_bytes(model.params))
  return [_measure(st, _compile(fn, *args, **kwargs))], info


def locate_stages(model, model_path: str, method: str, n_edits: int, mesh, overrides,
                  seq_len: int) -> tuple[list[Stage], dict[str, Any]]:
  """ROME / MEMIT / AlphaEdit: the statistics batch, one request's target optimisation and one
  module's closed form (`horse_jax.editors.locate.plan`); each holds the run's resident C, shifts
  (and AlphaEdit's projector and cache) besides its own arguments."""
  from horse_jax.editors.locate import plan as locate_plan
  from horse_jax.editors.protocol import resolve_settings
  resolved = resolve_settings(method, model_path, model, overrides=list(overrides))
  progs, info = locate_plan.programs(model, method, resolved, mesh, seq_len)
  weights = _shard_bytes(model.params)
  stages = []
  for name, fn, args, kwargs, what in progs:
    st = _measure(Stage(name, what, weights=weights), _compile(fn, *args, **kwargs))
    # Alive beside each program: the running sums while the statistics accumulate (laid out as one
    # batch's sums, the program's outputs); afterwards the run's replicated state (the solve's own
    # C / cache arguments are part of it).
    st.resident = (st.outputs if name == "statistics" else
                   max(0, info["resident_bytes"] - (st.arguments if name == "solve" else 0)))
    stages.append(st)
  return stages, info


def load_stage(model) -> Stage:
  w = _shard_bytes(model.params)
  return Stage("load", "sharded weights (each device reads its own slices)", weights=w, arguments=w)


def resolve_model_path(path_or_card: str) -> str:
  """A folder with config.json: the path itself, or models/<card>/ shipped with the repository."""
  import os
  from horse_jax.models.cards import CARDS_DIR
  if os.path.isfile(os.path.join(path_or_card, "config.json")):
    return path_or_card
  for name in (path_or_card, os.path.basename(path_or_card.rstrip("/"))):
    folder = os.path.join(str(CARDS_DIR), name)
    if os.path.isfile(os.path.join(folder, "config.json")):
      return folder
  try:
    from horse_jax.models.cards import card_for
    card = card_for(path_or_card)
  except UserError:
    card = None
  if card:
    folder = os.path.join(str(CARDS_DIR), card["name"])
    if os.path.isfile(os.path.join(folder, "config.json")):
      return folder
  raise UserError(f"--model {path_or_card!r}: no config.json there and no model card with a shipped "
                  "config (models/<card>/config.json)")


def _has_tokenizer(folder: str) -> bool:
  import os
  return any(os.path.isfile(os.path.join(folder, f))
             for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def data_token_shapes(data: str, tokenizer_folder: str, method: str, n_edits: int,
                      max_length: int | None = None) -> dict[str, Any]:
  """Token shapes of the records `horse-jax edit --data DATA --n-edits N` would edit.

  Each record is tokenized as the editors do (`data.tokenize.tokenize_edit`: prompt, then " " +
  target). seq_len is the longest (prompt + target) pair (for HORSE / MALMEN / MEND also the
  rephrase and locality pairs their meta-training step packs), cut at `max_length`; answer_tokens is
  the mean number of target tokens, rounded up (cached rows per edit).

  Args:
    data: an edit data file (any format `data.loaders.load_records` reads; UnKE is refused).
    tokenizer_folder: a folder with the model's tokenizer.
    method: the plan's method.
    n_edits: the first N records are measured (file order, as `edit --n-edits` takes them).
    max_length: the editors' truncation (`data.max_length`, else the context length), or None.

  Returns:
    {"seq_len", "answer_tokens", "mean_answer_tokens", "records", "data", "tokenizer"}.

  Raises:
    UserError: no tokenizer in the folder, an unreadable file, UnKE records.
  """
  from horse_jax.data.loaders import load_records
  from horse_jax.data.tokenize import IGNORE, tokenize_edit
  from horse_jax.data.unke import looks_like_unke
  from horse_jax.models import load_tokenizer
  if looks_like_unke(data):
    raise UserError(f"--data {data}: UnKE (unstructured) records are not planned from data; give "
                    "--seq-len and --answer-tokens")
  if not _has_tokenizer(tokenizer_folder):
    raise UserError(f"--data needs the model's tokenizer: {tokenizer_folder} has none (no "
                    "tokenizer.json / tokenizer_config.json); give --tokenizer DIR, or --seq-len and "
                    "--answer-tokens")
  tokenizer = load_tokenizer(tokenizer_folder)
  records = load_records(data, limit=n_edits)
  longest, answers = 0, []
  for r in records:
    pairs = [(r.prompt, r.target)]
    if method in HYPERNET:
      pairs += [(p, a) for p, a in ((r.rephrase, r.target), (r.loc_prompt, r.loc_answer)) if p and a]
    for i, (prompt, target) in enumerate(pairs):
      ids, labels, _ = tokenize_edit(tokenizer, prompt, target)
      longest = max(longest, len(ids))
      if i == 0:
        answers.append(sum(1 for x in labels if x != IGNORE))
  if max_length:
    longest = min(longest, int(max_length))
  mean = float(np.mean(answers))
  return {"seq_len": max(longest, 2), "answer_tokens": max(1, math.ceil(mean - 1e-9)),
          "mean_answer_tokens": mean, "records": len(records), "data": data,
          "tokenizer": tokenizer_folder}


def compiler_info(mesh) -> dict[str, Any]:
  """Which XLA compiler compiles for `mesh`, and whether it stands in for the target's.

  Forced CPU devices (`meshes.planning_mesh` on a host with fewer devices than the mesh) stand in
  for the accelerators the plan is for; the host's own accelerators, when it has enough, are the
  target.
  """
  device = mesh.devices.flat[0]
  platform = device.platform
  host = jax.default_backend()
  stand_in = platform == "cpu"
  if not stand_in:
    target = f"this host's {device.device_kind}"
  elif host != "cpu":
    target = f"{mesh.devices.size} x {jax.devices()[0].device_kind} (this host has {len(jax.devices())})"
  else:
    target = "the target's TPU / GPU chips (this host has none)"
  name = {"cpu": "XLA:CPU", "gpu": "XLA:GPU", "cuda": "XLA:GPU", "rocm": "XLA:GPU", "tpu": "XLA:TPU"}
  compiler = name.get(platform, f"XLA:{platform.upper()}")
  if stand_in:
    text = (f"compiled by {compiler} on {mesh.devices.size} forced CPU devices standing in for "
            f"{target}: layouts, fusion and collective scheduling differ a little on the target")
  else:
    text = f"compiled by {compiler} for {mesh.devices.size} x {device.device_kind}, the target's compiler"
  return {"compiler": compiler, "platform": platform, "device_kind": device.device_kind,
          "devices": int(mesh.devices.size), "stand_in": stand_in, "target": target, "text": text}


def plan(model_path: str, method: str, n_edits: int, mesh, dtype: str | None = None, overrides=(),
         fsdp: bool = False, answer_tokens: int | None = None, seq_len: int | None = None,
         data: str | None = None, tokenizer: str | None = None) -> dict[str, Any]:
  """Compiles every stage of `method` on abstract inputs and collects per-device memory, FLOPs and
  collectives.

  Args:
    model_path: folder with config.json (weights are never read), or a card name with a shipped config.
    method: horse, malmen, mend, horen, grace or ultraedit.
    n_edits: edits at once (hypernetworks), codebook rows (HoReN / GRACE) or edits in steps of
      `editor.batch_size` (UltraEdit).
    mesh: the (data, model) mesh to compile for.
    dtype: LM dtype; default the card's, else float32.
    overrides: `--set KEY=VALUE` settings (editor.rank=..., data.batch_size=..., ...).
    fsdp: split weights over `data` too.
    answer_tokens: cached rows per edit; None: measured on `data`, else 3 (ZsRE's mean). A given
      value wins over `data`.
    seq_len: tokens of one padded prompt + answer; None: measured on `data`, else 32. A given value
      wins over `data`.
    data: an edit data file to measure the token shapes on (`data_token_shapes`).
    tokenizer: the folder of the tokenizer for `data`; default the model folder.

  Returns:
    {"model", "method", "n_edits", "mesh", "dtype", "fsdp", "compiler": {...}, "token_shapes":
     {...}, "stages": [...], "peak_bytes_per_device", "peak_stage", "fits": {chip: bool},
     "info": {...}}.
  """
  from horse_jax.models import Model, read_config
  from horse_jax.models import sharding
  methods = HYPERNET + CODEBOOK + ULTRAEDIT + LOCATE + WRAPPED
  if method not in methods:
    raise UserError(f"--method must be one of {', '.join(methods)}")
  if n_edits < 1:
    raise UserError("--n-edits must be at least 1")
  folder = resolve_model_path(model_path)
  cfg = read_config(folder)
  card = _card(folder, cfg)
  dtype = dtype or card.get("dtype") or "float32"
  if dtype not in DTYPES:
    raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
  if tokenizer is not None and data is None:
    raise UserError("--tokenizer is for --data (it tokenizes the data file)")
  params = abstract_params(cfg, dtype)
  params = _with_sharding(params, sharding.param_shardings(params, mesh, fsdp))
  model = Model(params, cfg)
  shapes = {"seq_len": seq_len, "answer_tokens": answer_tokens,
            "seq_len_from": "--seq-len" if seq_len is not None else "default",
            "answer_tokens_from": "--answer-tokens" if answer_tokens is not None else "default"}
  if data is not None:
    from horse_jax.editors.protocol import resolve_settings
    max_length = (resolve_settings(method, folder, model, overrides=list(overrides)).tree()
                  .get("data", {}).get("max_length")) or cfg.max_position_embeddings
    measured = data_token_shapes(data, tokenizer or folder, method, n_edits, max_length)
    shapes["data"] = measured
    for key in ("seq_len", "answer_tokens"):
      if shapes[key] is None:
        shapes[key], shapes[f"{key}_from"] = measured[key], "--data"
  seq_len = SEQ_LEN if shapes["seq_len"] is None else int(shapes["seq_len"])
  answer_tokens = ANSWER_TOKENS if shapes["answer_tokens"] is None else int(shapes["answer_tokens"])
  shapes.update(seq_len=seq_len, answer_tokens=answer_tokens)
  if answer_tokens < 1 or seq_len < 2:
    raise UserError("--answer-tokens must be >= 1 and --seq-len >= 2")
  stages = [load_stage(model)]
  if method in HYPERNET:
    more, info = hypernet_stages(model, folder, method, n_edits, mesh, overrides, answer_tokens,
                                 seq_len)
  elif method in ULTRAEDIT:
    more, info = ultraedit_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  elif method in WRAPPED:
    more, info = wrapped_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  elif method in LOCATE:
    more, info = locate_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  else:
    more, info = codebook_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  stages += more
  peak = max(stages, key=lambda s: s.peak)
  groups = {"edit": [s for s in stages if s.name in ("load", "edit", "edit-step", "target", "solve")],
            "statistics": [s for s in stages if s.name == "statistics"],
            "meta-training step": [s for s in stages if s.name.startswith(("meta-step", "memo"))],
            "inference": [s for s in stages if s.name == "inference"]}
  return {
      "model": model_path, "config": folder, "method": method, "n_edits": n_edits,
      "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"]},
      "platform": mesh.devices.flat[0].platform, "compiler": compiler_info(mesh),
      "dtype": dtype, "fsdp": bool(fsdp), "token_shapes": shapes,
      "stages": [s.to_dict() for s in stages],
      "peak_bytes_per_device": peak.peak, "peak_stage": peak.name,
      "peaks": {k: max(s.peak for s in v) for k, v in groups.items() if v},
      "fits": {chip: peak.peak <= gib * GIB for chip, gib in CHIPS},
      "info": info,
  }


def _gib(n: float) -> str:
  x = n / GIB
  return f"{x:.2f}" if x >= 0.995 or x == 0 else f"{x:.3g}"


def _flops(f: float) -> str:
  if not f:
    return "-"
  exp = int(math.floor(math.log10(abs(f)) / 3)) if f else 0
  unit = ["", "K", "M", "G", "T", "P"][max(0, min(exp, 5))]
  return f"{f / 1000 ** max(0, min(exp, 5)):.1f} {unit}"


def _size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{int(n)} B"


def _largest(s: dict[str, Any]) -> str:
  op = s.get("largest_collective")
  if not op:
    return "-" if s["name"] != "load" else ""
  times = f" x{op['count']}" if op["count"] > 1 else ""
  shape = op["shape"]
  if shape.startswith("(") and shape.count("[") > 2:  # a combined op: the JSON lists its buffers
    shape = f"{shape.count('[')} buffers"
  return f"{op['kind']} {shape} {_size(op['bytes'])}{times}"


def _shapes_line(shapes: dict[str, Any]) -> str:
  data = shapes.get("data") or {}
  def source(key: str) -> str:
    where = shapes[f"{key}_from"]
    if where != "--data":
      return where
    if key == "seq_len":
      return f"longest of {data['records']} records of {data['data']}"
    return f"mean {data['mean_answer_tokens']:.2f} of {data['records']} records of {data['data']}, rounded up"
  return (f"token shapes: {shapes['seq_len']} tokens per edit ({source('seq_len')}), "
          f"{shapes['answer_tokens']} answer tokens per edit ({source('answer_tokens')})")


def markdown(result: dict[str, Any]) -> str:
  """The plan as a markdown table (GiB per device) plus the compiler, the token shapes, the peak
  and the chips it fits."""
  m = result["mesh"]
  lines = [f"{result['method']} on {result['model']} ({result['dtype']}), {result['n_edits']} edits, "
           f"mesh {m['data']}x{m['model']} (data x model){', FSDP' if result['fsdp'] else ''}; "
           f"GiB per device",
           result["compiler"]["text"],
           _shapes_line(result["token_shapes"]),
           "",
           "| stage | weights | arguments | outputs | temporaries | resident | peak | FLOPs | "
           "collectives | largest collective | what |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
  for s in result["stages"]:
    moved = "" if s["name"] == "load" else _gib(s["collective_bytes"])
    lines.append(f"| {s['name']} | {_gib(s['weights'])} | {_gib(s['arguments'])} | {_gib(s['outputs'])} | "
                 f"{_gib(s['temporaries'])} | {_gib(s['resident'])} | **{_gib(s['peak'])}** | "
                 f"{_flops(s['flops'])} | {moved} | {_largest(s)} | {s['what']} |")
  if any(s.get("unknown_trip_loops") for s in result["stages"]):
    lines += ["", "collectives inside loops of unknown trip count are counted once"]
  fits = [c for c, ok in result["fits"].items() if ok]
  lines += ["", f"peak {_gib(result['peak_bytes_per_device'])} GiB per device ({result['peak_stage']}); "
                f"fits: {', '.join(fits) if fits else 'none of ' + ', '.join(c for c, _ in CHIPS)}"]
  return "\n".join(lines) + "\n"
