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
  edit        DEFER / WISE: one edit (the program run once per record; `plan_program` of
              `horse_jax.editors.defer` / `horse_jax.editors.wise`)

`horse-jax train` runs `memo-fill` + `meta-step-memo` when the memo of its training records fits
`editor.memo_cache_mb` (replicated, per device), else `meta-step`; the plan does not know the
training set, so it compiles the memo programs whenever the budget holds one step's rows, with the
largest memo the budget allows. A program that cannot be lowered or compiled fails the plan with a
`UserError` naming it.

A stage's peak is arguments + outputs + temporaries - donated (aliased) bytes, plus `resident`: what
the caller keeps alive across the stage without passing it (e.g. the Adam state during an edit).
`peak_bytes_per_device` is the largest stage peak. When the mesh needs more devices than the host
has and the platform is CPU, the CLI forces that many CPU devices (XLA's CPU compiler then stands in
for the target: layouts and fusion differ a little from TPU/GPU).
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

from horse_jax.errors import UserError
from horse_jax.models.hf_map import abstract_params
from horse_jax.settings import CODEBOOK, HYPERNET, WRAPPED

GIB = 1024 ** 3
# Per-chip memory (GiB) of the accelerators the plan compares against.
CHIPS: tuple[tuple[str, float], ...] = (("TPU v5e", 16), ("TPU v4", 32), ("TPU v5p", 95),
                                        ("H100", 80), ("H200", 141))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
  from horse_jax.editors.codebook import settings as settings_lib
  from horse_jax.editors.codebook import state as state_lib
  from horse_jax.editors.protocol import resolve_settings
  from horse_jax.models import names

  # The resolution `horse-jax edit` uses (declared defaults <- model card <- --set).
  settings = settings_lib.from_resolved(
      resolve_settings(method, model_path, model, overrides=list(overrides)), model.config)
  d_in, d_out = (int(n) for n in names.get_kernel(model.params, settings.layer).shape)
  capacity = state_lib.planned_capacity(int(n_edits) + 1, settings.initial_capacity)
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
  info = {"layer": settings.layer, "codebook_rows": capacity, "codebook_bytes_per_device": _shard_bytes(book),
          "seq_len": seq_len, "edit_block": b}
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


def plan(model_path: str, method: str, n_edits: int, mesh, dtype: str | None = None, overrides=(),
         fsdp: bool = False, answer_tokens: int = 3, seq_len: int = 32) -> dict[str, Any]:
  """Compiles every stage of `method` on abstract inputs and collects per-device memory and FLOPs.

  Args:
    model_path: folder with config.json (weights are never read), or a card name with a shipped config.
    method: horse, malmen, mend, horen or grace.
    n_edits: edits at once (hypernetworks) or codebook rows (HoReN / GRACE).
    mesh: the (data, model) mesh to compile for.
    dtype: LM dtype; default the card's, else float32.
    overrides: `--set KEY=VALUE` settings (editor.rank=..., data.batch_size=..., ...).
    fsdp: split weights over `data` too.
    answer_tokens: cached rows per edit (answer tokens; ZsRE averages about 3).
    seq_len: tokens of one padded prompt + answer.

  Returns:
    {"model", "method", "n_edits", "mesh", "dtype", "fsdp", "stages": [...], "peak_bytes_per_device",
     "peak_stage", "fits": {chip: bool}, "info": {...}}.
  """
  from horse_jax.models import Model, read_config
  from horse_jax.models import sharding
  if method not in HYPERNET + CODEBOOK + WRAPPED:
    raise UserError(f"--method must be one of {', '.join(HYPERNET + CODEBOOK + WRAPPED)}")
  if n_edits < 1:
    raise UserError("--n-edits must be at least 1")
  folder = resolve_model_path(model_path)
  cfg = read_config(folder)
  card = _card(folder, cfg)
  dtype = dtype or card.get("dtype") or "float32"
  if dtype not in DTYPES:
    raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
  params = abstract_params(cfg, dtype)
  params = _with_sharding(params, sharding.param_shardings(params, mesh, fsdp))
  model = Model(params, cfg)
  stages = [load_stage(model)]
  if method in HYPERNET:
    more, info = hypernet_stages(model, folder, method, n_edits, mesh, overrides, answer_tokens,
                                 seq_len)
  elif method in WRAPPED:
    more, info = wrapped_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  else:
    more, info = codebook_stages(model, folder, method, n_edits, mesh, overrides, seq_len)
  stages += more
  peak = max(stages, key=lambda s: s.peak)
  groups = {"edit": [s for s in stages if s.name in ("load", "edit")],
            "meta-training step": [s for s in stages if s.name.startswith(("meta-step", "memo"))]}
  return {
      "model": model_path, "config": folder, "method": method, "n_edits": n_edits,
      "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"]},
      "platform": mesh.devices.flat[0].platform, "dtype": dtype, "fsdp": bool(fsdp),
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


def markdown(result: dict[str, Any]) -> str:
  """The plan as a markdown table (GiB per device) plus the peak and the chips it fits."""
  m = result["mesh"]
  lines = [f"{result['method']} on {result['model']} ({result['dtype']}), {result['n_edits']} edits, "
           f"mesh {m['data']}x{m['model']} (data x model){', FSDP' if result['fsdp'] else ''}; "
           f"GiB per device",
           "",
           "| stage | weights | arguments | outputs | temporaries | resident | peak | FLOPs | what |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for s in result["stages"]:
    lines.append(f"| {s['name']} | {_gib(s['weights'])} | {_gib(s['arguments'])} | {_gib(s['outputs'])} | "
                 f"{_gib(s['temporaries'])} | {_gib(s['resident'])} | **{_gib(s['peak'])}** | "
                 f"{_flops(s['flops'])} | {s['what']} |")
  fits = [c for c, ok in result["fits"].items() if ok]
  lines += ["", f"peak {_gib(result['peak_bytes_per_device'])} GiB per device ({result['peak_stage']}); "
                f"fits: {', '.join(fits) if fits else 'none of ' + ', '.join(c for c, _ in CHIPS)}"]
  return "\n".join(lines) + "\n"
