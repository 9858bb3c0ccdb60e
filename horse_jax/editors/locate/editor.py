"""ROME / MEMIT / AlphaEdit edits as pure functions over an explicit state.

  ctx = prepare(method, model, tokenizer, settings, covs)    # static pieces: settings, C, projectors
  state = init_state(ctx)                                    # no shifts yet (AlphaEdit: empty cache)
  state, infos = edit(ctx, state, requests)                  # one request after another
  edited = apply_shifts(ctx.model, state.shifts)             # base kernels + accumulated shifts

Each request is edited on the model as the earlier ones left it (the HoReN reference runs these
baselines sequentially, one request per step; AlphaEdit's cache of past keys carries over). Per
request:

  ROME       for each layer (sorted): u from the keys over all templates and C; z = target_init +
             delta at that layer (delta at its MLP output); kernel += u v^T
  MEMIT      z at the last layer's output; then layer by layer, on the model with the earlier
             layers already shifted: keys (averaged within the template groups, then across), the
             residual (z - current z) / layers left, kernel += (lambda C + K K^T)^-1 K R
  AlphaEdit  MEMIT's keys, z and spread; kernel += solve(P (K K^T + cache) + L2 I, P K R); then the
             keys of the fully edited model are added to the cache (cache += K K^T)

C is the unedited model's second moment (`stats.layer_moments`), as a statistics cache gives it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.editors.locate import requests as req_lib, solve
from horse_jax.editors.locate.settings import LocateEditorSettings
from horse_jax.editors.locate.targets import ZHyper, optimise_delta, module_output, subject_keys
from horse_jax.errors import UserError
from horse_jax.models import names


class LocateState(NamedTuple):
  """Edit state.

  Attributes:
    shifts: {module: [d_in, d_out] float32 kernel shift} summed over the edits so far.
    cache: AlphaEdit: {module: [d_in, d_in] sum of K K^T over the edits so far}; else None.
    n_edits: requests edited so far.
  """

  shifts: dict[str, jax.Array]
  cache: dict[str, jax.Array] | None
  n_edits: int = 0


@dataclasses.dataclass(frozen=True)
class Context:
  """What every edit of one run shares (built once by `prepare`).

  Attributes:
    method: rome | memit | alphaedit.
    model: the unedited Model.
    tokenizer: its tokenizer.
    settings: the editor settings.
    modules: the edited modules, in the settings' layer order.
    covs: {module: C [d_in, d_in]} (ROME without mom2_adjustment: {}).
    projectors: AlphaEdit: {module: P}; else {}.
    null_dims: AlphaEdit: {module: rank of P} (d_in: P is the identity).
    max_length: refuse prompts longer than this.
    put: places an array like the editor's state (replicated over the mesh, or as is).
  """

  method: str
  model: Any
  tokenizer: Any
  settings: LocateEditorSettings
  modules: tuple[str, ...]
  covs: dict
  projectors: dict
  null_dims: dict
  max_length: int | None
  put: Any


def modules_of(settings: LocateEditorSettings, config) -> tuple[str, ...]:
  """The edited module of each layer (UserError for a layer or module the model lacks)."""
  for layer in settings.layers:
    if layer >= config.num_layers:
      raise UserError(f"editor.layers: layer {layer} does not exist (the model has "
                      f"{config.num_layers} layers; set editor.layers)")
  mods = tuple(settings.module(layer) for layer in settings.layers)
  names.check_module_names(config, mods)
  return mods


def needs_covariance(settings: LocateEditorSettings) -> bool:
  """Whether the method reads C (ROME only with mom2_adjustment)."""
  return settings.method != "rome" or bool(getattr(settings, "mom2_adjustment", True))


def prepare(method: str, model, tokenizer, settings: LocateEditorSettings, covs: dict, *,
            max_length: int | None = None, mesh=None) -> Context:
  """The run's Context: checks the modules, places C and builds AlphaEdit's projectors."""
  if settings.method != method:
    raise UserError(f"settings are {settings.method}'s, not {method}'s")
  modules = modules_of(settings, model.config)
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), replicated)  # noqa: E731
  else:
    put = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  covs = {m: put(covs[m]) for m in modules if m in covs}
  projectors, null_dims = {}, {}
  if method == "alphaedit":
    for m in modules:
      p, dims = solve.null_space_projector(covs[m], settings.nullspace_threshold)
      projectors[m], null_dims[m] = p, int(dims)
  return Context(method, model, tokenizer, settings, modules, covs, projectors, null_dims,
                 max_length, put)


def init_state(ctx: Context) -> LocateState:
  """No edit yet: zero shifts (and an empty AlphaEdit cache)."""
  shifts = {m: ctx.put(jnp.zeros(names.get_kernel(ctx.model.params, m).shape, jnp.float32))
            for m in ctx.modules}
  cache = None
  if ctx.method == "alphaedit":
    cache = {m: ctx.put(jnp.zeros((shifts[m].shape[0],) * 2, jnp.float32)) for m in ctx.modules}
  return LocateState(shifts, cache, 0)


def apply_shifts(model, shifts: dict[str, jax.Array]):
  """The model with kernel += shift for every module (float32 sum, cast to the kernel dtype)."""
  return dataclasses.replace(model, params=names.add_to_kernels(model.params, shifts))


def _hyper(s: LocateEditorSettings) -> ZHyper:
  return ZHyper(*(jnp.float32(getattr(s, k)) for k in ZHyper._fields))


def _rows(rows: req_lib.Rows):
  return tuple(jnp.asarray(x) for x in rows)


def request_of(ctx: Context, record, index: int) -> req_lib.Request:
  """The tokenized request of one EditRecord."""
  prompt, subject, target, where = req_lib.record_fields(record, index)
  return req_lib.build_request(ctx.tokenizer, prompt, subject, target,
                               ctx.settings.context_templates, grouped=ctx.method != "rome",
                               max_length=ctx.max_length, where=where)


def grouped_keys(keys, groups: Sequence[int]):
  """The mean within each template group, then across the groups ([R, d] -> [d])."""
  bounds = np.cumsum((0,) + tuple(groups))
  return jnp.mean(jnp.stack([jnp.mean(keys[a:b], axis=0) for a, b in zip(bounds[:-1], bounds[1:])]),
                  axis=0)


def target_z(ctx: Context, model, request: req_lib.Request, layer: int, init_at_mlp: bool):
  """(target_init + delta, target_init, loss, steps) at `layer` on `model`."""
  s = ctx.settings
  ids, mask, lookup, labels = _rows(request.z_rows)
  loss_layer = min(max(s.v_loss_layer, layer), model.config.num_layers - 1)
  delta, init, loss, steps = optimise_delta(
      model, ids, mask, lookup, labels, jnp.float32(request.n_target), _hyper(s),
      module=s.module(layer), layer=layer, loss_layer=loss_layer, n_rewrites=request.n_rewrites,
      steps=s.v_num_grad_steps, init_at_mlp=init_at_mlp)
  return init + delta, init, loss, steps


def keys_at(model, request: req_lib.Request, module: str, layer: int):
  """(keys of every template row [R, d_in], layer outputs [R, D]) at the subject's last token."""
  ids, mask, lookup, _ = _rows(request.key_rows)
  return subject_keys(model, ids, mask, lookup, module=module, layer=layer)


def edit_rome(ctx: Context, state: LocateState, request: req_lib.Request):
  """One ROME request: a rank-one shift per layer, layers in increasing order."""
  s = ctx.settings
  shifts = dict(state.shifts)
  info = []
  for layer in sorted(s.layers):
    module = s.module(layer)
    model = apply_shifts(ctx.model, shifts)
    keys, _ = keys_at(model, request, module, layer)
    left = solve.rome_left(jnp.mean(keys, axis=0), ctx.covs.get(module) if needs_covariance(s) else None)
    z, _, loss, steps = target_z(ctx, model, request, layer, init_at_mlp=True)
    right = solve.rome_right(z, module_output(model, module, keys[0]), keys[0], left)
    shifts[module] = shifts[module] + solve.rome_shift(left, right)
    info.append((loss, steps))
  return LocateState(shifts, None, state.n_edits + 1), info


def edit_memit(ctx: Context, state: LocateState, requests: Sequence[req_lib.Request]):
  """MEMIT / AlphaEdit on a batch of requests (the sequential runs give one at a time)."""
  s = ctx.settings
  z_layer = s.layers[-1]
  z_module = s.module(z_layer)
  model = apply_shifts(ctx.model, state.shifts)
  zs, info = [], []
  for request in requests:
    z, _, loss, steps = target_z(ctx, model, request, z_layer, init_at_mlp=False)
    zs.append(z)
    info.append((loss, steps))
  zs = jnp.stack(zs)
  shifts = dict(state.shifts)
  all_keys = {}
  for i, (layer, module) in enumerate(zip(s.layers, ctx.modules)):
    model = apply_shifts(ctx.model, shifts)
    keys = jnp.stack([grouped_keys(keys_at(model, r, module, layer)[0], r.groups) for r in requests])
    current = jnp.stack([keys_at(model, r, z_module, z_layer)[1][0] for r in requests])
    resid = solve.spread(zs, current, len(s.layers) - i)
    if ctx.method == "alphaedit":
      shift = solve.alphaedit_shift(keys, resid, ctx.projectors[module], state.cache[module], s.L2)
    else:
      shift = solve.memit_shift(keys, resid, ctx.covs[module], s.mom2_update_weight)
    shifts[module] = shifts[module] + shift
  cache = state.cache
  if ctx.method == "alphaedit":  # the keys of the fully edited model join the cache
    model = apply_shifts(ctx.model, shifts)
    cache = dict(cache)
    for layer, module in zip(s.layers, ctx.modules):
      all_keys[module] = jnp.stack([grouped_keys(keys_at(model, r, module, layer)[0], r.groups)
                                    for r in requests])
      cache[module] = solve.cache_update(cache[module], all_keys[module])
  return LocateState(shifts, cache, state.n_edits + len(requests)), info


def edit(ctx: Context, state: LocateState, records: Sequence[Any], start_index: int = 0,
         bar=None) -> tuple[LocateState, list[dict]]:
  """Edits `records` one after another.

  Args:
    ctx: the run's Context.
    state: the state so far.
    records: EditRecords (each needs `extra["subject"]`, occurring once in its prompt).
    start_index: index of the first record (for error messages).
    bar: optional progress bar (`.update(1)` per edit).

  Returns:
    (new state, one {"z_loss", "z_steps"} per record: the target loss at its last evaluation and
    the Adam steps taken; ROME: of its last layer).
  """
  raw = []
  for i, record in enumerate(records, start_index):
    request = request_of(ctx, record, i)
    if ctx.method == "rome":
      state, info = edit_rome(ctx, state, request)
    else:
      state, info = edit_memit(ctx, state, [request])
    raw.append(info[-1])
    if bar is not None:
      bar.update(1)
  host = jax.device_get(raw)
  return state, [{"z_loss": float(loss), "z_steps": int(steps)} for loss, steps in host]
