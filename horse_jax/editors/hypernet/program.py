"""HORSE / MALMEN / MEND edit and meta-training step, each one compiled program over packed sets.

`edit_program(nets, norms, model, edits, cfg, mesh)` and
`train_program(state, model, edits, rephrase, loc, cfg, mesh)` are `jax.jit` functions (static: `cfg`,
`mesh`); their array arguments are `packing.Packed` sets, so `horse-jax plan` can lower them from
`jax.ShapeDtypeStruct`s of the same structure. Inside one program:

  1. the residual stream below the lowest edited layer, once per set (edit-invariant);
  2. cache: keys (captured inputs) and value gradients (d of the weighted label CE w.r.t. zero
     offsets on the module outputs), gathered at the cached rows;
  3. the normalizer folded in mini-batch by mini-batch, module by module (reference order);
  4. shifts (`shifts.solve_stacked`: hypernetwork, spread, ridge solve);
  5. train only: CE of the rephrases + CE / KL of the locality prompts with the shifts applied, the
     gradient dLoss/dS, the decoupled backward (`meta.decoupled_grads_stacked`), global-norm clip
     and Adam.

Nothing syncs with the host; metrics come back as device scalars. The state argument of
`train_program` is donated. `train_program_memo(state, model, memo, rows, rephrase, loc, cfg, mesh)`
is the same step with step 2 replaced by a gather from a memo of the training records' keys / value
grads (`memo.py`; filled once by `fill_memo_program`), as `horse-jax train` runs it when the memo
fits `editor.memo_cache_mb`.

The LM runs over the packed rows in chunks (`packing.lm_chunks`, a `lax.scan` when there are several):
the cache keeps only the keys / value grads at the cached rows of each chunk, and the meta losses sum
the loss and dLoss/dS chunk by chunk, so only one chunk's LM activations (and their backward) are
alive at once, whatever the number of edits.

Sharding (`mesh`, a (`data`, `model`) Mesh, or None): packed rows are split over `data`; cached rows
are split over `data` x `model` when their count divides (else over `data`), so the cache of many
edits does not sit whole on each device of a `model`-only mesh; the ridge solve splits K^T K, its
Cholesky factor and the solutions by row over all devices (the gram reduce-scattered, the factor
blocked, refined solves: `shifts.ridge_factor`), and the shifts come back split by output column
over `model`; hypernetwork state is replicated.
The cache is stacked by run of modules sharing a hypernetwork (`shifts.Stacked`), and the
normalizer statistics, the solves and the meta backward each scan over the modules, so one
module's temporaries (its [d_k, d_k] ridge factor above all) are alive at a time; the forward keeps
each factor for the backward, split by row over all devices.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.distributed import global_array
from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet import packing
from horse_jax.editors.hypernet import shifts as shifts_lib
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.meta import decoupled_grads_stacked
from horse_jax.editors.hypernet.packing import Packed
from horse_jax.editors.hypernet.state import optimizer
from horse_jax.editors.precision import exact
from horse_jax.models import Hooks, Model
from horse_jax.models import layers as layers_lib
from horse_jax.models.hooks import Tap
from horse_jax.models.names import add_to_kernels
from horse_jax.models.transformer import arch, embed

DATA, MODEL = "data", "model"


def _constrain(x, mesh, spec):
  """with_sharding_constraint when a mesh is given (no-op on one device)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _rows_spec(mesh, n: int):
  """P(data) on a leading dim of n when `data` divides it, else replicated."""
  return P(DATA) if mesh is not None and n % mesh.shape[DATA] == 0 else P()


def _cache_spec(mesh, n: int):
  """Cached rows: P((data, model)) when data * model divides n, else as `_rows_spec`."""
  if mesh is not None and n % (mesh.shape[DATA] * mesh.shape[MODEL]) == 0:
    return P((DATA, MODEL))
  return _rows_spec(mesh, n)


def _chunks(packed: Packed):
  """(n, [n, ...] per-chunk row/label arrays) of a packed set (see `packing.lm_chunks`).

  Chunk c holds the rows c, c + n, ...; its label indices are made local to the chunk.
  """
  w, width = packed.input_ids.shape
  n = packing.lm_chunks(w, width)
  rows = lambda x: jnp.swapaxes(x.reshape(w // n, n, width), 0, 1)
  idx = packed.label_index
  local = (idx // width // n) * width + idx % width
  labels = lambda x: x.reshape(n, -1)
  return n, (rows(packed.input_ids), rows(packed.position_ids), rows(packed.segment_ids),
             labels(local), labels(packed.label_ids), labels(packed.label_weight))


def _part(xs) -> Packed:
  """One chunk as a Packed set (rows and labels only)."""
  return Packed(*xs, None, None, None, None)


def _scan(body, init, n: int, xs):
  """lax.scan over n chunks; one chunk runs without a loop (the same program as before chunking)."""
  if n == 1:
    carry, _ = body(init, jax.tree_util.tree_map(lambda x: x[0], xs))
    return carry
  carry, _ = lax.scan(body, init, xs)
  return carry


def _packed_bias(packed: Packed, sliding_window: int | None) -> jax.Array:
  """[W, 1, P, P] additive bias: causal inside a segment, nothing across segments or on padding."""
  seg = packed.segment_ids
  width = seg.shape[1]
  q = jnp.arange(width)[:, None]
  k = jnp.arange(width)[None, :]
  allowed = (k <= q)[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  if sliding_window is not None:
    allowed = allowed & (k > q - sliding_window)[None]
  return jnp.where(allowed, 0.0, layers_lib.NEG_INF).astype(jnp.float32)[:, None]


def _layers(model: Model, h, packed: Packed, bias, tap: Tap, start: int, stop: int):
  mod = arch(model.config)
  for i in range(start, stop):
    h, _ = mod.block(mod.layer_params(model.params, i), model.config, h, packed.position_ids, bias,
                     tap, i)
  return h


def stream_below(model: Model, packed: Packed, low: int, mesh=None):
  """Residual stream entering layer `low` [W, P, D] and the packed attention bias."""
  bias = _packed_bias(packed, model.config.sliding_window)
  h = embed(model, packed.input_ids, packed.position_ids)
  h = _constrain(h, mesh, _rows_spec(mesh, h.shape[0]))
  return _layers(model, h, packed, bias, Tap(None), 0, low), bias


def last_layer_modules(model: Model, names) -> tuple[str, ...]:
  """The names among `names` that belong to the last decoder layer."""
  prefix = f"{arch(model.config).layer_prefix}.{model.config.num_layers - 1}."
  return tuple(n for n in names if n.startswith(prefix))


def can_trim_last(model: Model, hooked) -> bool:
  """Whether the last layer may run at the label positions only (`label_logits(trim=True)`) with
  hooks at `hooked` modules: its hooked modules must lie after the attention keys / values (the
  architecture's edit module: the MLP output, or o_proj), which the trimmed layer computes unhooked."""
  suffix = "." + arch(model.config).edit_module
  return all(n.endswith(suffix) for n in last_layer_modules(model, hooked))


def _last_layer_at_labels(model: Model, h, packed: Packed, bias, hooks: Hooks | None):
  """The last decoder layer at the label positions only: ([L, D] outputs, captures [L, d_in]).

  The loss reads the last layer's output at label positions only, so its queries, attention output
  and MLP at the other ~80% of positions are wasted work (forward and backward). The layer runs
  twice through the architecture's own `block`: over every position with an empty KV cache, of
  which only the cache (keys / values) is used (XLA drops the rest of that pass), then once per
  label position (`vmap`) as a one-token step that writes its own key / value at its slot and
  attends over its packed row's keys / values with that position's row of the packed bias. Each
  label position so sees exactly the keys and values of the full layer.

  Args:
    model: the LM (possibly with shifted kernels).
    h: residual stream entering the last layer [W, P, D].
    packed: the set (label_index into W * P).
    bias: the packed attention bias [W, 1, P, P].
    hooks: hooks of last-layer modules; their offsets are [L, d_out] (label layout).
  """
  cfg, mod = model.config, arch(model.config)
  last = cfg.num_layers - 1
  params = mod.layer_params(model.params, last)
  w, width, _ = h.shape
  empty = jnp.zeros((w, width, cfg.num_kv_heads, cfg.head_dim), h.dtype)
  _, (k_all, v_all) = mod.block(params, cfg, h, packed.position_ids, bias, Tap(None), last,
                                cache=(empty, empty, 0))
  row, slot = packed.label_index // width, packed.label_index % width
  hooks = hooks or Hooks()

  def one(h_d, k_sxgxd, v_sxgxd, position, bias_s, slot_i, offsets):
    tap = Tap(Hooks(capture=hooks.capture, offsets={n: o[None, None] for n, o in offsets.items()}))
    out, _ = mod.block(params, cfg, h_d[None, None], position[None, None], bias_s[None, None, None],
                       tap, last, cache=(k_sxgxd[None], v_sxgxd[None], slot_i))
    return out[0, 0], {n: x[0, 0] for n, x in tap.captured.items()}

  return jax.vmap(one)(h[row, slot], k_all[row], v_all[row], packed.position_ids[row, slot],
                       bias[row, 0, slot], slot, dict(hooks.offsets))


def label_logits(model: Model, h, packed: Packed, bias, low: int, hooks: Hooks | None = None,
                 trim: bool = True):
  """Logits [L, V] at the label positions only, from the stream entering `low`; and the captures.

  With `trim` the last layer runs at the label positions only (`_last_layer_at_labels`; needs
  `can_trim_last`): captures and offsets of last-layer modules are then [L, d] in label order,
  those of lower layers [W, P, d].
  """
  tap = Tap(hooks)
  n_layers = model.config.num_layers
  if not trim:
    h = _layers(model, h, packed, bias, tap, low, n_layers)
    h_lxd = h.reshape(-1, h.shape[-1])[packed.label_index]
    captured = tap.captured
  else:
    h = _layers(model, h, packed, bias, tap, low, n_layers - 1)
    last = None
    if hooks is not None:
      names = last_layer_modules(model, hooks.names())
      last = Hooks(capture=tuple(n for n in hooks.capture if n in names),
                   offsets={n: o for n, o in hooks.offsets.items() if n in names})
    h_lxd, captured_last = _last_layer_at_labels(model, h, packed, bias, last)
    captured = {**tap.captured, **captured_last}
  logits = arch(model.config).head(model.params, model.config, h_lxd[None], Tap(None))[0]
  return logits.astype(jnp.float32), captured


def _nll(logits_LxV, packed: Packed):
  logp = jax.nn.log_softmax(logits_LxV, axis=-1)
  return -jnp.take_along_axis(logp, packed.label_ids[:, None], axis=-1)[:, 0]


def weighted_ce(logits_LxV, packed: Packed) -> jax.Array:
  """Sum over mini-batches of the token-mean CE (label weights = 1 / tokens of the mini-batch)."""
  return jnp.sum(packed.label_weight * _nll(logits_LxV, packed))


def weighted_kl(pre_LxV, post_LxV, packed: Packed) -> jax.Array:
  """Sum over mini-batches of the token-mean KL(pre || post) on label positions."""
  pre = jax.nn.log_softmax(pre_LxV, axis=-1)
  post = jax.nn.log_softmax(post_LxV, axis=-1)
  return jnp.sum(packed.label_weight * jnp.sum(jnp.exp(pre) * (pre - post), axis=-1))


def cached_keys_grads(model: Model, packed: Packed, cfg: HypernetConfig, mesh=None):
  """Keys and value grads of every edited module at the cached rows (the LM part of the cache).

  Returns:
    ({name: keys [R, d_k]}, {name: value grads [R, d_v]}) in float32, rows in `packed.rows` order,
    split as `_cache_spec` says; padding rows hold whatever their index points at (mask them).
  """
  low = cfg.lowest_layer
  n, parts = _chunks(packed)
  width = packed.input_ids.shape[1]
  n_rows = packed.rows.shape[0]
  spec = _cache_spec(mesh, n_rows)
  rows = _constrain(packed.rows, mesh, spec)
  row_chunk = (rows // width) % n
  row_local = (rows // width // n) * width + rows % width

  # Cached rows at label positions only ("ans"): the last layer can then run at those alone; its
  # modules' keys / value grads come back in label order, found through the inverse of label_index.
  trim = cfg.token == "ans" and can_trim_last(model, cfg.modules)
  in_last = set(last_layer_modules(model, cfg.modules)) if trim else set()

  def body(carry, xs):
    c, part = xs[0], _part(xs[1:])
    h, bias = stream_below(model, part, low, mesh)
    wc = part.input_ids.shape[0]
    n_labels = part.label_index.shape[0]
    zeros = {m: jnp.zeros((n_labels, dv) if m in in_last else (wc, width, dv), h.dtype)
             for m, (_, dv) in zip(cfg.modules, cfg.shapes)}

    def loss_fn(offsets):
      logits, captured = label_logits(model, h, part, bias, low,
                                      Hooks(capture=cfg.modules, offsets=offsets), trim)
      return weighted_ce(logits, part), captured

    grads, captured = jax.grad(loss_fn, has_aux=True)(zeros)
    take = (row_chunk == c)[:, None]
    if in_last:  # label entry of each cached row (padding label entries, weight 0, are dropped)
      real = jnp.where(part.label_weight > 0, part.label_index, wc * width)
      entry = jnp.zeros((wc * width,), jnp.int32).at[real].set(
          jnp.arange(n_labels, dtype=jnp.int32), mode="drop")[row_local]
    keys, vgrads = {}, {}
    for name, (dk, dv) in zip(cfg.modules, cfg.shapes):
      at = entry if name in in_last else row_local
      k = captured[name].reshape(-1, dk)[at].astype(jnp.float32)
      g = grads[name].reshape(-1, dv)[at].astype(jnp.float32)
      keys[name] = _constrain(jnp.where(take, k, carry[0][name]), mesh, spec)
      vgrads[name] = _constrain(jnp.where(take, g, carry[1][name]), mesh, spec)
    return (keys, vgrads), None

  init = tuple({m: _constrain(jnp.zeros((n_rows, d[i]), jnp.float32), mesh, spec)
                for m, d in zip(cfg.modules, cfg.shapes)} for i in (0, 1))
  return _scan(body, init, n, (jnp.arange(n),) + parts)


@exact  # normalizer statistics (horse_jax.editors.precision)
def stack_and_normalize(keys: dict, vgrads: dict, valid, row_batch, batch_rows, norms: dict,
                        cfg: HypernetConfig, mesh=None):
  """The stacked cache (padding rows zeroed) and the normalizers updated in reference order.

  Args:
    keys, vgrads: per module [R, d] at the cached rows (`cached_keys_grads` or a memo).
    valid: [R] 1 on real rows; row_batch: [R] reference mini-batch of each row;
      batch_rows: [n_batches] rows per mini-batch.
    norms: shape key -> NormState.

  Returns:
    (`shifts.Stacked` cache, updated norms).
  """
  spec = _cache_spec(mesh, valid.shape[0])
  valid = _constrain(valid, mesh, spec)
  # Stacked by run of modules sharing a hypernetwork (the solves scan over them); the padding mask
  # fuses into the stacking copy.
  stacked_spec = P(None, *spec)
  stack = lambda per_module: [_constrain(x * valid[None, :, None], mesh, stacked_spec)
                              for x in shifts_lib.stack_modules(per_module, cfg)]
  cache = shifts_lib.Stacked(stack(keys), stack(vgrads), valid)

  # One update per mini-batch and module, in the reference order (batch by batch, modules in config
  # order inside a batch; the running statistics depend on the grouping). Each module's per-batch
  # statistics come from segment sums over its rows (keys and value grads separately: the
  # statistics are per column), one module at a time (`lax.map`); only the [batches, width]
  # results are merged.
  n_batches = batch_rows.shape[0]

  def module_stats(kg):
    (m_k, mean_k, var_k), (_, mean_g, var_g) = (
        normalizer.group_stats(x, valid, row_batch, n_batches) for x in kg)
    return m_k, jnp.concatenate([mean_k, mean_g], -1), jnp.concatenate([var_k, var_g], -1)

  stats: dict = {}
  for run, k_run, g_run in zip(shifts_lib.module_runs(cfg), cache.keys, cache.grads):
    stats.setdefault(cfg.shape_keys[run[0]], []).append(lax.map(module_stats, (k_run, g_run)))
  norms = dict(norms)
  for skey, per_run in stats.items():
    # [modules, batches, ...] -> batch-major sequence: batch j of module a, of module b, ...
    seq = [jnp.swapaxes(jnp.concatenate(parts), 0, 1).reshape(-1, *parts[0].shape[2:])
           for parts in zip(*per_run)]
    norms[skey] = normalizer.merge_groups(norms[skey], *seq)
  return cache, norms


def cache_rows(model: Model, norms: dict, packed: Packed, cfg: HypernetConfig, mesh=None):
  """Keys / value grads at the cached rows and the normalizers updated in reference order.

  Returns:
    (`shifts.Stacked` cache, rows split as `_cache_spec` says, updated norms).
  """
  keys, vgrads = cached_keys_grads(model, packed, cfg, mesh)
  return stack_and_normalize(keys, vgrads, packed.row_valid, packed.row_batch, packed.batch_rows,
                             norms, cfg, mesh)


def _chunk(cfg: HypernetConfig, n_rows: int) -> int:
  return n_rows if n_rows <= cfg.chunk else cfg.chunk


def _shift_spec(mesh, d_v: int):
  return P(None, MODEL) if mesh is not None and d_v % mesh.shape[MODEL] == 0 else P()


def _replicate(tree, mesh):
  return jax.tree_util.tree_map(lambda x: _constrain(x, mesh, P()), tree)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def edit_program(nets: dict, norms: dict, model: Model, edits: Packed, cfg: HypernetConfig,
                 mesh=None):
  """Shifts for all packed edits at once: cache, normalizer, hypernetwork, spread, solves.

  Args:
    nets: shape key -> hypernetwork params.
    norms: shape key -> NormState.
    model: the unedited LM (sharded or not).
    edits: the packed edit set (`packing.pack(..., with_rows=True)`).
    cfg: editor config (static).
    mesh: (`data`, `model`) Mesh or None (static).

  Returns:
    (shifts {name: [d_k, d_v]} split by column over `model`, updated norms).
  """
  cache, norms = cache_rows(model, norms, edits, cfg, mesh)
  chunk = _chunk(cfg, edits.rows.shape[0])
  solved = shifts_lib.solve_stacked(nets, norms, cache, cfg, chunk, mesh)
  shifts = shifts_lib.unstack_modules(solved.shifts, cfg)
  shifts = {n: _constrain(s, mesh, _shift_spec(mesh, s.shape[1])) for n, s in shifts.items()}
  return shifts, _replicate(norms, mesh)


def meta_losses(model: Model, shifts: dict, rephrase: Packed, loc: Packed, cfg: HypernetConfig,
                mesh=None):
  """(gen_loss, loc_loss, dLoss/dS): the reference's losses summed over mini-batches.

  HORSE: sum CE(rephrase) + sum CE(loc answers); MALMEN/MEND: sum CE(rephrase) + loc_coef *
  sum KL(pre || post) on the loc label positions.
  """
  low = cfg.lowest_layer
  horse = cfg.method == "horse"
  coef = 1.0 if horse else cfg.loc_coef

  def set_loss(packed: Packed, kl: bool):
    """(sum of the set's loss, its gradient w.r.t. the shifts), one LM chunk at a time."""
    n, parts = _chunks(packed)

    def body(carry, xs):
      part = _part(xs)
      h, b = stream_below(model, part, low, mesh)
      pre = lax.stop_gradient(label_logits(model, h, part, b, low)[0]) if kl else None

      def loss_fn(s):
        post = label_logits(Model(add_to_kernels(model.params, s), model.config), h, part, b, low)[0]
        return weighted_kl(pre, post, part) if kl else weighted_ce(post, part)

      loss, g = jax.value_and_grad(loss_fn)(shifts)
      g = {m: _constrain(carry[1][m] + g[m], mesh, _shift_spec(mesh, g[m].shape[1])) for m in g}
      return (carry[0] + loss, g), None

    init = (jnp.zeros((), jnp.float32),
            {m: _constrain(jnp.zeros_like(x), mesh, _shift_spec(mesh, x.shape[1]))
             for m, x in shifts.items()})
    return _scan(body, init, n, parts)

  gen, dgen = set_loss(rephrase, False)
  locl, dloc = set_loss(loc, not horse)
  dshifts = {m: dgen[m] + coef * dloc[m] for m in dgen}
  return gen, locl, dshifts


def _meta_grads(nets: dict, model: Model, cache, norms: dict, n_rows: int, rephrase: Packed,
                loc: Packed, cfg: HypernetConfig, mesh):
  """(meta-gradient of the hypernetworks, gen_loss, loc_loss) given the cache (steps 4-5 before
  the clip and Adam)."""
  chunk = _chunk(cfg, n_rows)
  with jax.named_scope("solve"):
    solved = shifts_lib.solve_stacked(nets, norms, cache, cfg, chunk, mesh)
  shifts = shifts_lib.unstack_modules(solved.shifts, cfg)
  with jax.named_scope("meta_losses"):
    gen, locl, dshifts = meta_losses(model, shifts, rephrase, loc, cfg, mesh)
  with jax.named_scope("meta_backward"):
    grads = decoupled_grads_stacked(nets, norms, cache, solved,
                                    shifts_lib.stack_modules(dshifts, cfg), cfg, chunk, mesh)
  if cfg.method != "malmen":  # only MALMEN trains lamda
    grads = {k: {**g, "lamda": jnp.zeros_like(g["lamda"])} for k, g in grads.items()}
  return grads, gen, locl


def _meta_step(state, model: Model, cache, norms: dict, n_rows: int, rephrase: Packed, loc: Packed,
               cfg: HypernetConfig, mesh):
  """Everything of a meta-training step after the cache (see the module docstring, steps 4-5)."""
  grads, gen, locl = _meta_grads(state.nets, model, cache, norms, n_rows, rephrase, loc, cfg, mesh)
  gnorm = optax.tree.norm(grads)
  updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.nets)
  nets = optax.apply_updates(state.nets, updates)
  new = state._replace(nets=nets, norms=norms, opt_state=opt_state, step=state.step + 1)
  return _replicate(new, mesh), {"gen_loss": gen, "loc_loss": locl, "grad_norm": gnorm}


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("state",))
def train_program(state, model: Model, edits: Packed, rephrase: Packed, loc: Packed,
                  cfg: HypernetConfig, mesh=None):
  """One meta-training step (see the module docstring); `state` (a HypernetState) is donated.

  Args:
    state: HypernetState (nets, norms, Adam state, step).
    model: the unedited LM.
    edits, rephrase, loc: packed sets of this step's N records.
    cfg: editor config (static).
    mesh: (`data`, `model`) Mesh or None (static).

  Returns:
    (new state, {"gen_loss", "loc_loss", "grad_norm"} device scalars).
  """
  with jax.named_scope("cache"):
    cache, norms = cache_rows(model, state.norms, edits, cfg, mesh)
  return _meta_step(state, model, cache, norms, edits.rows.shape[0], rephrase, loc, cfg, mesh)


def _memo_cache(state, memo, rows, cfg: HypernetConfig, mesh):
  """The step's cache gathered from the memo (weights applied) and the updated normalizers."""
  memo_keys, memo_grads = memo
  spec = _cache_spec(mesh, rows.slots.shape[0])
  slots = _constrain(rows.slots, mesh, spec)
  weight = _constrain(rows.weight, mesh, spec)[:, None]
  keys = {m: _constrain(memo_keys[m][slots], mesh, spec) for m in cfg.modules}
  vgrads = {m: _constrain(memo_grads[m][slots] * weight, mesh, spec) for m in cfg.modules}
  return stack_and_normalize(keys, vgrads, rows.valid, rows.row_batch, rows.batch_rows,
                             state.norms, cfg, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("state",))
def train_program_memo(state, model: Model, memo, rows, rephrase: Packed, loc: Packed,
                       cfg: HypernetConfig, mesh=None):
  """`train_program` with the cache read from a memo of the training records (`memo.CacheMemo`).

  The unedited model's keys and value gradients of a record do not change during meta-training,
  so they are computed once per record (with unit label weights) and each step gathers them; a
  cached row's value gradient is its memoized one times its mini-batch's label weight
  (1 / label tokens of the mini-batch), which is what `train_program` computes (the weight is a
  common factor of the whole backward of a sequence).

  Args:
    state: HypernetState (donated).
    model: the unedited LM (for the rephrase / locality losses).
    memo: (keys {name: [S, d_k]}, grads {name: [S, d_v]}) memoized rows.
    rows: `memo.MemoRows` of this step (slots, weights, valid, row_batch, batch_rows).
    rephrase, loc: packed sets of this step's N records.
  """
  with jax.named_scope("cache"):
    cache, norms = _memo_cache(state, memo, rows, cfg, mesh)
  return _meta_step(state, model, cache, norms, rows.slots.shape[0], rephrase, loc, cfg, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def meta_grads_program(state, model: Model, edits: Packed | None, rephrase: Packed, loc: Packed,
                       cfg: HypernetConfig, mesh=None, memo=None, rows=None):
  """The meta-gradient a training step would clip and apply, without applying it (state kept).

  For checks and benchmarks that compare gradients across meshes and cache paths: with `memo` and
  `rows` the cache is gathered as `train_program_memo` does, else computed from `edits` as
  `train_program` does.

  Returns:
    (gradients with the structure of `state.nets` (replicated), {"gen_loss", "loc_loss"}).
  """
  if memo is None:
    cache, norms = cache_rows(model, state.norms, edits, cfg, mesh)
    n_rows = edits.rows.shape[0]
  else:
    cache, norms = _memo_cache(state, memo, rows, cfg, mesh)
    n_rows = rows.slots.shape[0]
  grads, gen, locl = _meta_grads(state.nets, model, cache, norms, n_rows, rephrase, loc, cfg, mesh)
  return _replicate(grads, mesh), {"gen_loss": gen, "loc_loss": locl}


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("memo",))
def fill_memo_program(memo, model: Model, packed: Packed, slots, cfg: HypernetConfig, mesh=None):
  """Writes the keys / value grads of a packed set's cached rows into memo rows `slots` [R].

  `packed` must carry unit label weights (1 on every real label); padding rows point at a slot
  that no record uses. The memo (keys, grads) is donated and returned updated.
  """
  keys, vgrads = cached_keys_grads(model, packed, cfg, mesh)
  memo_keys, memo_grads = memo
  return ({m: _replicate(memo_keys[m].at[slots].set(keys[m]), mesh) for m in cfg.modules},
          {m: _replicate(memo_grads[m].at[slots].set(vgrads[m]), mesh) for m in cfg.modules})


def put_array(x, mesh=None):
  """A host array on device: its leading dim split over `data` when a mesh is given and it divides."""
  if mesh is None:
    return jnp.asarray(x)
  spec = _rows_spec(mesh, x.shape[0]) if x.ndim and x.shape[0] > 1 else P()
  if jax.process_count() > 1:  # every process holds the whole set; each device takes its slice
    return global_array(x, NamedSharding(mesh, spec))
  return jax.device_put(x, NamedSharding(mesh, spec))


def put(packed, mesh=None):
  """Device arrays of a packed set (or any NamedTuple of host arrays; None fields stay None), rows
  split over `data` when a mesh is given."""
  return type(packed)(*[None if x is None else put_array(x, mesh) for x in packed])
