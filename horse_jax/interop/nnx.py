"""Edit a Flax NNX causal LM in place with horse-jax editors.

The user keeps their own `nnx.Module` (its sharding, its `nnx.jit`, its sampler). Linear modules are
addressed by their path in the NNX graph written with dots (`model.layers.3.mlp.down_proj`: list
indices are path parts), which is the Hugging Face name when the model follows the HF layout.

  keys, grads, loss = keys_and_value_grads(model, names, loss_fn, *args)    # NNX hooks
  shifts, state = edit(state, model, cfg, batches)          # HORSE / MALMEN / MEND on the NNX model
  old = apply_shifts(model, shifts)                         # kernel [in, out] += shift (nnx.update)
  nnx.update(model, old)                                    # exact revert
  wrap_codebook(model, book, settings)                      # HoReN / GRACE codebook as a module
  Model(horse_params(model), config)                        # same arrays as a horse-jax Model

How the hooks work: the model is split into (graphdef, state) and merged again inside the traced
function, so the copy that is traced is private; in that copy each target `nnx.Linear` is replaced
(module surgery) by `_Tapped`, which records its input (the key) and adds an offset to its output.
Differentiating the loss with respect to a zero offset gives the value gradient
d loss / d (module output), exactly what `horse_jax.models.Hooks(capture=..., offsets=...)` gives
for a horse-jax `Model`. The user's model object is never modified by these functions.

Limits: target modules must be `nnx.Linear` instances reached by attribute or list index (layers
stacked under `nnx.scan` have one [L, d_in, d_out] kernel and no per-layer module to address), and
inputs are [B, T, d_in]. HoReN/GRACE edits themselves (the Adam fit of each codebook value) run on a
horse-jax `Model` (for a model in the HF layout: `horse_params`, the same arrays); the NNX side
serves the resulting codebook.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horse_jax.data.tokenize import EditBatch, bucket_length
from horse_jax.editors.codebook.adapter import make_adapter
from horse_jax.editors.codebook.edit import token_ce
from horse_jax.editors.codebook.infer import left_padded_positions
from horse_jax.editors.codebook.settings import CodebookSettings
from horse_jax.editors.codebook.state import Codebook
from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet import shifts as shifts_lib
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.packing import padded_rows, token_mask
from horse_jax.errors import UserError

__all__ = [
    "CodebookLinear", "apply_shifts", "build_cache", "call_model", "clear_edit_positions",
    "codebook_modules", "edit", "horse_params", "keys_and_value_grads", "linear_modules",
    "module_shapes",
    "set_edit_positions", "set_prompt_positions", "unwrap_codebook", "wrap_codebook",
]


# ----------------------------------------------------------------------------------------------
# Addressing modules by name


def _dotted(path: Sequence[Any]) -> str:
  return ".".join(str(part) for part in path)


def _modules_of(model: nnx.Module, kind: type) -> dict[str, tuple[tuple, Any]]:
  return {_dotted(path): (tuple(path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, kind)}


def linear_modules(model: nnx.Module) -> dict[str, nnx.Linear]:
  """Every `nnx.Linear` of the model by dotted graph path (`model.layers.0.mlp.down_proj`)."""
  return {name: node for name, (_, node) in _modules_of(model, nnx.Linear).items()}


def _find_linears(model: nnx.Module, names: Sequence[str]) -> dict[str, nnx.Linear]:
  found = linear_modules(model)
  for name in names:
    if name not in found:
      near = sorted(found)[:3]
      raise UserError(f"no nnx.Linear named {name!r} in {type(model).__name__} (e.g. {near})")
  return {name: found[name] for name in names}


def module_shapes(model: nnx.Module, names: Sequence[str]) -> tuple[tuple[int, int], ...]:
  """(d_in, d_out) of each named Linear, for `HypernetConfig(shapes=...)`."""
  linears = _find_linears(model, names)
  return tuple((int(linears[n].in_features), int(linears[n].out_features)) for n in names)


def horse_params(model: nnx.Module) -> dict:
  """The model's `nnx.Param` arrays as a horse-jax param tree (nested dicts, string keys).

  The arrays are shared, not copied. When the NNX model follows the Hugging Face layout with
  horse-jax leaf names (`kernel` [in, out], `embedding`, norm `scale`, `bias`), as Flax's own
  `nnx.Linear` / `nnx.Embed` do, `horse_jax.models.Model(horse_params(model), config)` is the same
  network, so every horse-jax editor (HoReN/GRACE codebook edits included) runs on its weights.

  Args:
    model: the NNX model.

  Returns:
    {"model": {"layers": {"0": {...}}, ...}, "lm_head": {...}} of jax arrays.
  """
  def strings(tree):
    if isinstance(tree, dict):
      return {str(key): strings(child) for key, child in tree.items()}
    return tree

  return strings(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _replace_child(model: nnx.Module, name: str, new: nnx.Module) -> Any:
  """Puts `new` where the module `name` sits (attribute or list slot); returns the old child."""
  parts = name.split(".")
  parent: Any = model
  for part in parts[:-1]:
    parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
  last = parts[-1]
  if last.isdigit():
    old, parent[int(last)] = parent[int(last)], new
  else:
    old = getattr(parent, last)
    setattr(parent, last, new)
  return old


# ----------------------------------------------------------------------------------------------
# Keys and value gradients through NNX


class _Record:
  """Plain Python holder shared by the taps of one traced call (static: not part of the state)."""

  def __init__(self, offsets: Mapping[str, jax.Array]):
    self.offsets = offsets
    self.captured: dict[str, jax.Array] = {}


class _Tapped(nnx.Module):
  """Stands in for a target Linear inside one traced call: records its input (the key) and adds
  the caller's offset to its output (its gradient is the value gradient)."""

  def __init__(self, linear: nnx.Linear, name: str, record: _Record):
    self.linear = linear
    self.name = name
    self.record = record

  def __call__(self, x):
    self.record.captured[self.name] = x
    y = self.linear(x)
    offset = self.record.offsets.get(self.name)
    return y if offset is None else y + offset.astype(y.dtype)


def _tapped_run(graphdef, state, names, loss_fn, offsets, args):
  model = nnx.merge(graphdef, state)  # a private copy: surgery here never reaches the caller
  record = _Record(offsets)
  for name in names:
    _replace_child(model, name, _Tapped(_find_linears(model, (name,))[name], name, record))
  loss = loss_fn(model, *args)
  missing = [n for n in names if n not in record.captured]
  if missing:
    raise UserError(f"module {missing[0]!r} was not called by loss_fn")
  return loss, record.captured


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _keys_and_grads_jit(graphdef, state, names, d_outs, loss_fn, args):
  # Offsets have the shape of each module's output: its input's leading axes (found by tracing
  # the tapped call once, nothing is computed) and the module's d_out.
  shapes = jax.eval_shape(lambda s, a: _tapped_run(graphdef, s, names, loss_fn, {}, a)[1], state,
                          args)
  zeros = {n: jnp.zeros(shapes[n].shape[:-1] + (d,), jnp.float32) for n, d in zip(names, d_outs)}
  (loss, keys), grads = jax.value_and_grad(
      lambda off: _tapped_run(graphdef, state, names, loss_fn, off, args), has_aux=True)(zeros)
  return keys, grads, loss


def keys_and_value_grads(model: nnx.Module, names: Sequence[str], loss_fn: Callable[..., jax.Array],
                         *args) -> tuple[dict, dict, jax.Array]:
  """Inputs of the named Linears and d loss / d (their outputs), through the NNX model.

  Args:
    model: any NNX module (not modified).
    names: dotted graph paths of target `nnx.Linear` modules.
    loss_fn: `loss_fn(model, *args) -> scalar`, calling the model as the user does. Pass the same
      function object each time (it is a static argument of a jitted program).
    *args: arrays passed through to `loss_fn` (traced).

  Returns:
    (keys {name: input [..., d_in]}, grads {name: [..., d_out] float32}, loss).
  """
  names = tuple(names)
  d_outs = tuple(d_out for _, d_out in module_shapes(model, names))
  graphdef, state = nnx.split(model)
  return _keys_and_grads_jit(graphdef, state, names, d_outs, loss_fn, args)


# ----------------------------------------------------------------------------------------------
# HORSE / MALMEN / MEND on an NNX model


def call_model(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The default call convention: `model(input_ids, attention_mask=attention_mask)` -> logits."""
  return model(input_ids, attention_mask=attention_mask)


def _ce_loss(call, model, input_ids, attention_mask, labels):
  return token_ce(call(model, input_ids, attention_mask), labels)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _cache_batch(graphdef, state, norms, modules, shapes, call, input_ids, attention_mask, labels,
                 rows_R, valid_R):
  """Keys/value grads of one mini-batch at flat positions `rows_R`, and the updated normalizers
  (what `hypernet.program` caches for a horse-jax Model, over the NNX model's whole forward pass)."""
  b, t = input_ids.shape
  cfg = HypernetConfig(method="malmen", modules=modules, shapes=shapes)  # for its shape keys
  loss_fn = functools.partial(_ce_loss, call)
  zeros = {n: jnp.zeros((b, t, dv), jnp.float32) for n, (_, dv) in zip(modules, shapes)}
  (_, captured), grads = jax.value_and_grad(
      lambda off: _tapped_run(graphdef, state, modules, loss_fn, off,
                              (input_ids, attention_mask, labels)), has_aux=True)(zeros)
  v = valid_R.astype(jnp.float32)[:, None]
  keys_out, grads_out, norms = {}, {}, dict(norms)
  for name, (dk, dv), skey in zip(modules, shapes, cfg.shape_keys):
    k = captured[name].reshape(b * t, dk).astype(jnp.float32)[rows_R] * v
    g = grads[name].reshape(b * t, dv).astype(jnp.float32)[rows_R] * v
    keys_out[name], grads_out[name] = k, g
    norms[skey] = normalizer.update(norms[skey], jnp.concatenate([k, g], axis=-1), valid_R)
  return keys_out, grads_out, norms


class Cache(NamedTuple):
  """Per-module rows of one set of edits (all modules share the row layout).

  Attributes:
    keys: name -> [R, d_k] float32 (zero on padding rows).
    grads: name -> [R, d_v] float32 value gradients (zero on padding rows).
    valid: [R] float32, 1 on real rows.
  """

  keys: dict
  grads: dict
  valid: jax.Array


def build_cache(model: nnx.Module, norms: dict, cfg: HypernetConfig, batches: Sequence[EditBatch],
                call: Callable = call_model) -> tuple[Cache, dict, int]:
  """Keys and value grads of the edits for an NNX model: the rows, normalizer updates and padding
  of `hypernet.edit` (reference order: mini-batch by mini-batch, row-major inside each).

  Args:
    model: the NNX LM (not modified).
    norms: shape key -> NormState (updated and returned).
    cfg: editor config; `cfg.modules` are dotted NNX paths, `cfg.shapes` from `module_shapes`.
    batches: right-padded LM mini-batches of the edits (`hypernet.edit_batches`).
    call: `call(model, input_ids, attention_mask) -> logits [B, T, V]` (a module-level function).

  Returns:
    (Cache, updated norms, chunk).
  """
  if module_shapes(model, cfg.modules) != tuple(tuple(s) for s in cfg.shapes):
    raise UserError(f"cfg.shapes {cfg.shapes} do not match the NNX modules "
                    f"{module_shapes(model, cfg.modules)}")
  graphdef, state = nnx.split(model)
  keys = {n: [] for n in cfg.modules}
  grads = {n: [] for n in cfg.modules}
  valid = []
  for batch in batches:
    flat = np.nonzero(token_mask(batch, cfg.token).reshape(-1))[0]
    size = bucket_length(len(flat), minimum=8)
    rows = np.zeros((size,), np.int32)
    rows[:len(flat)] = flat
    ok = np.zeros((size,), np.float32)
    ok[:len(flat)] = 1.0
    k, g, norms = _cache_batch(graphdef, state, norms, tuple(cfg.modules), tuple(cfg.shapes), call,
                               jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                               jnp.asarray(batch.labels), jnp.asarray(rows), jnp.asarray(ok))
    for n in cfg.modules:
      keys[n].append(k[n])
      grads[n].append(g[n])
    valid.append(ok)
  # Same row layout as the horse-jax cache: real rows first, one padding to the chunked total.
  real = np.nonzero(np.concatenate(valid))[0]
  total, chunk = padded_rows(len(real), cfg.chunk)
  take = np.zeros((total,), np.int32)
  take[:len(real)] = real
  ok = np.zeros((total,), np.float32)
  ok[:len(real)] = 1.0
  take_j, ok_j = jnp.asarray(take), jnp.asarray(ok)

  def cat(parts):
    return jnp.concatenate(parts, axis=0)[take_j] * ok_j[:, None]

  cache = Cache({n: cat(keys[n]) for n in cfg.modules}, {n: cat(grads[n]) for n in cfg.modules},
                ok_j)
  return cache, norms, chunk


def edit(state, model: nnx.Module, cfg: HypernetConfig, batches: Sequence[EditBatch],
         call: Callable = call_model) -> tuple[dict, Any]:
  """`hypernet.edit` on an NNX model: shifts {name: [d_in, d_out]} for all edits at once.

  Args:
    state: a `hypernet.HypernetState` (e.g. a meta-trained one loaded with the hypernet checkpoint
      functions; its modules must have the NNX model's shapes).
    model: the NNX LM (not modified; write the shifts with `apply_shifts`).
    cfg: editor config with NNX module paths.
    batches: LM mini-batches of the edits.
    call: the model's call convention (see `build_cache`).

  Returns:
    (shifts, state with the normalizers updated, as `hypernet.edit` returns).
  """
  cache, norms, chunk = build_cache(model, state.norms, cfg, batches, call)
  return _solve(state.nets, norms, cache, cfg, chunk), state._replace(norms=norms)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _solve(nets: dict, norms: dict, cache: Cache, cfg: HypernetConfig, chunk: int) -> dict:
  """Shifts from a cache: the hypernetwork, spread and solves of `hypernet.edit`."""
  stack = functools.partial(shifts_lib.stack_modules, cfg=cfg)
  stacked = shifts_lib.Stacked(stack(cache.keys), stack(cache.grads), cache.valid)
  return shifts_lib.unstack_modules(shifts_lib.solve_stacked(nets, norms, stacked, cfg, chunk).shifts,
                                    cfg)


def apply_shifts(model: nnx.Module, shifts: Mapping[str, jax.Array]) -> nnx.State:
  """Adds each shift [d_in, d_out] to its Linear's kernel in place (`nnx.update`).

  The sum is taken in float32 and cast back to the kernel dtype; the new kernel keeps the old
  kernel's sharding.

  Args:
    model: the NNX model (modified in place).
    shifts: name -> shift [d_in, d_out] (HORSE/MALMEN/MEND `edit` output).

  Returns:
    The previous kernels as an `nnx.State`: `nnx.update(model, old)` reverts exactly.
  """
  found = _modules_of(model, nnx.Linear)
  new, old = {}, {}
  for name, shift in shifts.items():
    if name not in found:
      raise UserError(f"no nnx.Linear named {name!r} in {type(model).__name__}")
    path, linear = found[name]
    kernel = linear.kernel[...]
    if tuple(kernel.shape) != tuple(shift.shape):
      raise UserError(f"shift for {name!r} has shape {tuple(shift.shape)}, kernel "
                      f"{tuple(kernel.shape)}")
    value = (kernel.astype(jnp.float32) + shift).astype(kernel.dtype)
    if isinstance(kernel, jax.Array) and hasattr(kernel, "sharding"):
      value = jax.device_put(value, kernel.sharding)
    new[path + ("kernel",)] = value
    old[path + ("kernel",)] = kernel
  nnx.update(model, nnx.from_flat_state(new))
  return nnx.from_flat_state(old)


# ----------------------------------------------------------------------------------------------
# HoReN / GRACE codebook as an NNX module


class CodebookArray(nnx.Variable):
  """Codebook buffers inside an NNX model (not `nnx.Param`: optimizers leave them alone)."""


class EditPosition(nnx.Variable):
  """Per-row edit position p and prompt start used by `CodebookLinear`."""


class CodebookLinear(nnx.Module):
  """A Linear followed by the HoReN/GRACE codebook adapter, as one NNX module.

  At the edit position p of each row (the last prompt token) the query is built from this module's
  own input, looked up in the codebook, and the output row is changed exactly as the horse-jax
  codebook hook does (HoReN value: y[p] += match * value[j*]; LoRA: y[p] += s * match * B A y[p];
  GRACE: y[p] = value[j] if match). Positions: by default every call is edited at its last
  position with the prompt starting at 0 (a batch of unpadded prompts). For padding or a KV-cache
  sampler call `set_prompt_positions` (left-padded prompts) or `set_edit_positions` first; calls
  shorter than the prompt (decode steps) then pass through unchanged, since the edit acted on the
  prompt when it was prefilled.

  Attributes:
    linear: the wrapped `nnx.Linear` (unchanged).
    settings: the codebook's `CodebookSettings` (static).
  """

  def __init__(self, linear: nnx.Linear, book: Codebook, settings: CodebookSettings):
    self.linear = linear
    self.settings = settings
    for field in Codebook.__dataclass_fields__:
      setattr(self, f"book_{field}", CodebookArray(getattr(book, field)))
    self.edit_pos = EditPosition(jnp.zeros((0,), jnp.int32))
    self.prompt_start = EditPosition(jnp.zeros((0,), jnp.int32))
    self.prompt_length = 0  # 0: positions not set (edit each call at its last position)

  @property
  def codebook(self) -> Codebook:
    return Codebook(**{f: getattr(self, f"book_{f}")[...] for f in Codebook.__dataclass_fields__})

  def set_codebook(self, book: Codebook) -> None:
    """Swaps in a newer codebook (e.g. after more sequential edits; capacity may differ)."""
    for field in Codebook.__dataclass_fields__:
      getattr(self, f"book_{field}").set_value(getattr(book, field))

  def __call__(self, x):
    y = self.linear(x)
    if x.ndim != 3:
      raise UserError(f"CodebookLinear expects inputs [B, T, d_in], got shape {x.shape}")
    b, t = x.shape[0], x.shape[1]
    if self.prompt_length == 0:
      p, start = jnp.full((b,), t - 1, jnp.int32), jnp.zeros((b,), jnp.int32)
    elif t < self.prompt_length:
      return y
    else:
      p, start = self.edit_pos[...], self.prompt_start[...]
    return make_adapter(self.codebook, self.settings, p, start)(x, y)


def codebook_modules(model: nnx.Module) -> dict[str, CodebookLinear]:
  """Every `CodebookLinear` of the model by dotted graph path."""
  return {name: node for name, (_, node) in _modules_of(model, CodebookLinear).items()}


def wrap_codebook(model: nnx.Module, book: Codebook, settings: CodebookSettings,
                  name: str | None = None) -> CodebookLinear:
  """Replaces the Linear `name` (default `settings.layer`) by a `CodebookLinear` in place.

  Args:
    model: the NNX model (modified in place; everything else, sharding included, is kept).
    book: a codebook built by `horse_jax.editors.codebook` for a model with the same weights.
    settings: its settings.
    name: dotted graph path of the wrapped Linear.

  Returns:
    The new module (also reachable at `name` in the model).
  """
  name = name or settings.layer
  linear = _find_linears(model, (name,))[name]
  if book.keys.shape[1] != linear.in_features or book.values.shape[1] != linear.out_features:
    raise UserError(f"codebook [{book.keys.shape[1]} -> {book.values.shape[1]}] does not fit "
                    f"{name!r} [{linear.in_features} -> {linear.out_features}]")
  wrapped = CodebookLinear(linear, book, settings)
  _replace_child(model, name, wrapped)
  return wrapped


def unwrap_codebook(model: nnx.Module, name: str) -> nnx.Linear:
  """Puts the original Linear back in place of the `CodebookLinear` at `name`; returns it."""
  found = codebook_modules(model)
  if name not in found:
    raise UserError(f"no CodebookLinear named {name!r} (have {sorted(found)})")
  _replace_child(model, name, found[name].linear)
  return found[name].linear


def set_edit_positions(model: nnx.Module, edit_pos: jax.Array, prompt_start: jax.Array | None,
                       prompt_length: int) -> None:
  """Sets where every `CodebookLinear` of the model edits.

  Args:
    model: the NNX model.
    edit_pos: [B] edit position p per row (last prompt token), as an index into the call's T axis.
    prompt_start: [B] first real prompt token per row (default 0).
    prompt_length: calls shorter than this pass through (decode steps after the prefill).
  """
  edit_pos = jnp.asarray(edit_pos, jnp.int32)
  start = jnp.zeros_like(edit_pos) if prompt_start is None else jnp.asarray(prompt_start, jnp.int32)
  for module in codebook_modules(model).values():
    module.edit_pos.set_value(edit_pos)
    module.prompt_start.set_value(start)
    module.prompt_length = int(prompt_length)


def set_prompt_positions(model: nnx.Module, attention_mask: jax.Array) -> None:
  """For left-padded prompts about to be prefilled: p = T - 1, start = first attended slot."""
  p, start = left_padded_positions(attention_mask)
  set_edit_positions(model, p, start, attention_mask.shape[1])


def clear_edit_positions(model: nnx.Module) -> None:
  """Back to the default: every call edited at its last position, prompt starting at 0."""
  for module in codebook_modules(model).values():
    module.edit_pos.set_value(jnp.zeros((0,), jnp.int32))
    module.prompt_start.set_value(jnp.zeros((0,), jnp.int32))
    module.prompt_length = 0
