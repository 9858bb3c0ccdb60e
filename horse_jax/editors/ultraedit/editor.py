"""UltraEdit: lifelong, training-free editing by closed-form ridge solves over normalised gradients.

Per edit step (`editor.batch_size` requests), at each edited module (`model.edit_modules`, the
reference's `inner_params`):

  k, g     per-token keys (module inputs) and value gradients (d CE / d module output) of the model
           as edited so far, at every attended token (`token: mask`), BOS included
  stats    one running mean / std per weight shape (modules of one shape share it), folded in for
           each (mini-batch, module) in turn, mini-batches sorted by attended tokens, longest first
           (stable), before any shift is computed (`hypernet.normalizer`: `var += m * var_unbiased(X)
           + n m delta^2 / n'`, `std = sqrt(var / (n - 1 + eps))`)
  k^, g^   = (concat(k, g) - mean) / (std + eps), split
  v        = -lr * |k^|^2 * g^                                   value shifts [R, d_out]
  S        = (K^T K + I)^{-1} K^T V                              raw keys K, float32, [d_in, d_out]
  W       += S

Tokenization is the reference runner's: the input is tok(prompt + " " + target) (with BOS), the
labels are tok(" " + target) with its BOS, aligned to the last len(labels) logits before the final
position (so BOS is the label of the position that would predict the last prompt token). The loss
of a mini-batch (`editor.batch_size_once` requests) is the token mean of its label CE.

The statistics are lifelong by default (the paper's method): they keep every batch seen since `init`.
`editor.lifelong_normalizer: false` starts each edit step from empty statistics, as the reference
runner does (it builds a new editor on every call).

The state is explicit: `UltraEditState(norms, deltas, n_edits)`, the statistics per shape key and the
accumulated weight shifts (float32, kernel layout [d_in, d_out]); the edited model is base + deltas.
One edit step is one compiled program (`edit_step`): the forward / backward over the packed requests
(`hypernet.program.cached_keys_grads`, the machinery HORSE / MALMEN use), the statistics
(`hypernet.program.stack_and_normalize`), the value shifts and the solves (`hypernet.shifts
.ridge_solve`). With a mesh, cached rows are split over `data`, the solve's right-hand side and the
shifts by column over `model`, the statistics are replicated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import IGNORE, EditBatch, bucket_length, padding_id
from horse_jax.editors.hypernet import normalizer, packing, program
from horse_jax.editors.hypernet import shifts as shifts_lib
from horse_jax.editors.hypernet.config import HypernetConfig, module_shapes
from horse_jax.editors.ultraedit.settings import UltraEditEditorSettings
from horse_jax.errors import UserError
from horse_jax.models import Model
from horse_jax.models import names as names_lib
from horse_jax.models.names import add_to_kernels



def config_for(settings, model: Model) -> HypernetConfig:
  """The static config of the shared key / gradient machinery (`hypernet.program`).

  Args:
    settings: a `horse_jax.settings.Resolved` of ultraedit, or an `UltraEditSettings`.
    model: the LM (default modules; module shapes).

  Returns:
    A HypernetConfig with method "ultraedit", token "all" (= `token: mask`), chunk
    `editor_batch_size` and LM mini-batch `batch_size_once` (the hypernetwork fields are unused).
  """
  typed = settings.typed if hasattr(settings, "typed") else settings
  modules = typed.model.edit_modules or names_lib.default_edit_modules(model.config)
  modules = tuple(str(m) for m in modules)
  names_lib.check_module_names(model.config, modules)
  ed = typed.editor
  return HypernetConfig(method="ultraedit", modules=modules,
                        shapes=module_shapes(model.params, modules), lr=ed.lr,
                        chunk=ed.editor_batch_size, token="all", lm_batch=ed.batch_size_once)


# ---------------------------------------------------------------- state


class UltraEditState(NamedTuple):
  """Edit state of UltraEdit.

  Attributes:
    norms: shape key "{d_in}x{d_out}" -> `normalizer.NormState` (the lifelong statistics).
    deltas: {module: [d_in, d_out] float32} weight shifts accumulated over every edit step.
    n_edits: requests edited so far.
  """

  norms: dict
  deltas: dict
  n_edits: int = 0


def empty_norms(cfg: HypernetConfig, mesh=None) -> dict:
  """Empty statistics per shape key (replicated with a mesh)."""
  norms = {key: normalizer.init(k + v) for key, (k, v) in zip(cfg.shape_keys, cfg.shapes)}
  return norms if mesh is None else jax.device_put(norms, NamedSharding(mesh, P()))


def init(cfg: HypernetConfig, mesh=None) -> UltraEditState:
  """Empty statistics and zero shifts (shifts split by column over `model` with a mesh)."""
  norms = empty_norms(cfg, mesh)
  deltas = {m: jnp.zeros(s, jnp.float32) for m, s in zip(cfg.modules, cfg.shapes)}
  if mesh is not None:
    deltas = {m: jax.device_put(d, NamedSharding(mesh, program._shift_spec(mesh, d.shape[1])))
              for m, d in deltas.items()}
  return UltraEditState(norms, deltas, 0)


def apply(model: Model, state: UltraEditState) -> Model:
  """The edited model: each edited kernel plus its accumulated shift (cast to the kernel dtype)."""
  return Model(add_to_kernels(model.params, state.deltas), model.config)


# ---------------------------------------------------------------- tokenization


def tokenize_request(tokenizer, prompt: str, target: str, max_length: int | None = None):
  """(input_ids, labels) of one request, as the reference runner builds them.

  input_ids = tok(prompt + t), t = target with a leading space added when it has none; the labels
  tok(t) (its special tokens included) sit at the last len(tok(t)) positions before the final one
  (logits at position j predict labels[j]); earlier labels are dropped when they do not fit.

  Args:
    tokenizer: a transformers tokenizer.
    prompt, target: the request.
    max_length: keep only the last `max_length` tokens (None: all).

  Returns:
    (ids, labels) as int32 arrays of equal length (labels IGNORE where there is none).
  """
  if not target:
    raise UserError(f"prompt {prompt!r}: empty target")
  spaced = target if target.startswith(" ") else " " + target
  ids = list(tokenizer(prompt + spaced)["input_ids"])
  lab = list(tokenizer(spaced)["input_ids"])
  n = len(ids)
  lab = lab[-(n - 1):] if n > 1 else []
  labels = [IGNORE] * n
  labels[n - 1 - len(lab):n - 1] = lab
  if max_length is not None and n > max_length:
    ids, labels = ids[n - max_length:], labels[n - max_length:]
  return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def request_batches(tokenizer, records: Sequence[EditRecord], batch_size_once: int,
                    max_length: int | None = None) -> list[EditBatch]:
  """Right-padded mini-batches of `batch_size_once` requests (file order), sorted by attended tokens,
  longest first (stable), as the reference orders them before caching.

  `prompt_len` holds the position of the first label + 1.
  """
  pad = padding_id(tokenizer)
  rows = [tokenize_request(tokenizer, r.prompt, r.target, max_length) for r in records]
  batches = []
  for start in range(0, len(rows), batch_size_once):
    part = rows[start:start + batch_size_once]
    width = bucket_length(max(len(ids) for ids, _ in part))
    ids_a = np.full((len(part), width), pad, np.int32)
    mask = np.zeros((len(part), width), np.int32)
    labels = np.full((len(part), width), IGNORE, np.int32)
    first = np.zeros((len(part),), np.int32)
    for i, (ids, lab) in enumerate(part):
      ids_a[i, :len(ids)], mask[i, :len(ids)], labels[i, :len(ids)] = ids, 1, lab
      first[i] = int(np.argmax(lab != IGNORE)) + 1
    batches.append(EditBatch(ids_a, mask, labels, first))
  order = sorted(range(len(batches)), key=lambda j: -int(batches[j].attention_mask.sum()))
  return [batches[j] for j in order]


# ---------------------------------------------------------------- the update


def value_shifts(norm: normalizer.NormState, keys_RxK: jax.Array, grads_RxV: jax.Array, lr,
                 chunk: int) -> jax.Array:
  """v = -lr * |k^|^2 * g^ per row, (k^, g^) = the normalised concat(k, g); `chunk` rows at a time."""
  d_k = keys_RxK.shape[1]

  def row(kg):
    z = normalizer.normalize(norm, jnp.concatenate(kg)[None])[0]
    k_hat, g_hat = z[:d_k], z[d_k:]
    return -lr * jnp.sum(k_hat * k_hat) * g_hat

  return lax.map(row, (keys_RxK, grads_RxV), batch_size=min(chunk, keys_RxK.shape[0]))


def solve_shifts(norms: dict, cache: shifts_lib.Stacked, lr, cfg: HypernetConfig, mesh=None) -> dict:
  """{module: S [d_in, d_out]}: value shifts and ridge solve of every module, one `lax.scan` over the
  modules of each run of one shape (one module's K^T K alive at a time).

  Args:
    norms: shape key -> statistics (already updated with this step's rows).
    cache: the stacked keys / value grads (padding rows zero, `cache.valid` 0 there).
    lr: `editor.lr` (traced).
    cfg: the static config.
    mesh: optional mesh (solve columns over `model`).
  """
  out = []
  for run, k_run, g_run in zip(shifts_lib.module_runs(cfg), cache.keys, cache.grads):
    norm = norms[cfg.shape_keys[run[0]]]

    def body(carry, kg, norm=norm):
      k, g = kg
      v = value_shifts(norm, k, g, lr, cfg.chunk) * cache.valid[:, None]
      return carry, shifts_lib.ridge_solve(k, v, jnp.zeros((), jnp.float32), mesh)

    out.append(lax.scan(body, (), (k_run, g_run))[1])
  return shifts_lib.unstack_modules(out, cfg)


def update_from_cache(norms: dict, keys: dict, vgrads: dict, valid, row_batch, batch_rows, lr,
                      cfg: HypernetConfig, mesh=None):
  """The update of one step from its keys / value gradients: statistics, value shifts, solves.

  Args:
    norms: shape key -> statistics before the step.
    keys, vgrads: {module: [R, d]} float32 rows (mini-batch by mini-batch, in update order).
    valid: [R] 1 on real rows; row_batch: [R] mini-batch of each row; batch_rows: [n_batches].
    lr: `editor.lr`.
    cfg: the static config.
    mesh: optional mesh.

  Returns:
    ({module: S [d_in, d_out]}, updated statistics).
  """
  cache, norms = program.stack_and_normalize(keys, vgrads, valid, row_batch, batch_rows, norms, cfg,
                                             mesh)
  return solve_shifts(norms, cache, lr, cfg, mesh), norms


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("deltas", "norms"))
def edit_step(model: Model, deltas: dict, norms: dict, packed: packing.Packed, lr,
              cfg: HypernetConfig, mesh=None):
  """One edit step, one program: keys / value grads of the model as edited so far, statistics,
  value shifts, solves; `deltas` and `norms` are donated.

  Returns:
    (deltas + this step's shifts, updated statistics).
  """
  edited = Model(add_to_kernels(model.params, deltas), model.config)
  keys, vgrads = program.cached_keys_grads(edited, packed, cfg, mesh)
  shifts, norms = update_from_cache(norms, keys, vgrads, packed.row_valid, packed.row_batch,
                                    packed.batch_rows, lr, cfg, mesh)
  new = {m: program._constrain(deltas[m] + s, mesh, program._shift_spec(mesh, s.shape[1]))
         for m, s in shifts.items()}
  return new, program._replicate(norms, mesh)


def edit(state: UltraEditState, model: Model, tokenizer, records: Sequence[EditRecord],
         settings: UltraEditEditorSettings, cfg: HypernetConfig, mesh=None,
         max_length: int | None = None, packer: packing.Packer | None = None) -> UltraEditState:
  """Edits `records` in steps of `settings.batch_size` requests, each on the model edited so far.

  The state's arrays are donated to the compiled step: keep the returned state.

  Args:
    state: statistics and shifts so far.
    model: the unedited LM (sharded over `mesh` or not).
    tokenizer: its tokenizer.
    records: the requests, in order (a last step may hold fewer than batch_size).
    settings: the editor settings.
    cfg: `config_for(settings, model)`.
    mesh: optional (`data`, `model`) mesh.
    max_length: longest tokenized request (left-truncated beyond).
    packer: a `packing.Packer` kept across calls (shapes only grow: few compiles).

  Returns:
    The new state.
  """
  packer = packer or packing.Packer(cfg.chunk, 8 if mesh is None else max(8, mesh.shape["data"]))
  norms, deltas, done = state
  lr = jnp.float32(settings.lr)
  for start in range(0, len(records), settings.batch_size):
    part = list(records[start:start + settings.batch_size])
    batches = request_batches(tokenizer, part, settings.batch_size_once, max_length)
    packed = program.put(packer("edits", batches, cfg.token, True), mesh)
    # The reference runner's reset: every step from empty statistics (they are donated: new ones).
    step_norms = norms if settings.lifelong_normalizer else empty_norms(cfg, mesh)
    deltas, norms = edit_step(model, deltas, step_norms, packed, lr, cfg, mesh)
    done += len(part)
  return UltraEditState(norms, deltas, done)
