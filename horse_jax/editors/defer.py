"""DEFER: a learned gate at one linear module deciding between its output and a trained adapter.

The HoReN reference's DEFER baseline (its `src/models/defer/`), in JAX. One module (Llama-3-8B:
`model.layers.29.mlp.down_proj`, d_in -> d_out) is wrapped; its weights never change. The editor
owns four arrays, shared by every edit:

  gate     g(q) = sigmoid(q . w_g + b_g)          w_g [d_in], b_g scalar
  adapter  v(q) = q W_v + b_v                     W_v [d_in, d_out], b_v [d_out]

initialised as torch's `nn.Linear` (every entry uniform in +-1/sqrt(d_in)), where q is the module's
input at the *last* position of the sequence (the reference's `key_id = -1`).

  training   y'_t = g v + (1 - g) y_t at every position t (a soft mix, one gate per sequence)
  inference  y'_t = v if g >= threshold else y_t, at every position (a hard switch)
  untrained  y' = y (until the first edit, the wrapped module is the original)

An edit (batch size 1, as the reference runs it) trains all four arrays with a fresh Adam(edit_lr)
(torch defaults: betas 0.9/0.999, eps 1e-8) for `n_iter` steps on the token-mean cross-entropy of
"prompt target" over the target tokens (prompt masked); the rest of the model is frozen. The gate is
trained only through the soft mix: the threshold is used at inference alone. Edits are sequential:
each starts from the arrays the previous one left.

The sequence the gate sees is the whole "prompt target" (last target token included) both when
training and when scoring, as in the reference (see `horse_jax.editors.whole_sequence`).

  cfg = DeferEditorSettings(layer="model.layers.3.mlp.down_proj")
  state = init(cfg, d_in, d_out)                         # or editor = make_editor("defer", ...)
  state, infos = apply_edits(model, state, batch, cfg)   # one after another
  logits = logits_fn(model, state, cfg)(batch)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from horse_jax.data.tokenize import EditBatch
from horse_jax.editors.codebook.edit import row_acc, token_ce
from horse_jax.editors.codebook.settings import CodebookEval, default_layer
from horse_jax.editors.whole_sequence import full_sequence, greedy_whole, layer_io, logits_with_output
from horse_jax.editors.whole_sequence import scored_logits
from horse_jax.errors import UserError
from horse_jax.models import Model
from horse_jax.typed_config import DataSettings, ModelSettings, Settings, module_name, setting, to_flat


@dataclasses.dataclass(frozen=True)
class DeferEditorSettings(Settings):
  """`editor.*` of DEFER (the reference's hparams names: hparams/DEFER/*.yaml)."""

  layer: str | None = setting(
      None, "wrapped linear module (HF name); None = the model card's HoReN layer, else the MLP "
      "output projection at depth round(0.9 L)", parse=module_name)
  n_iter: int = setting(100, "Adam steps per edit", minimum=1)
  edit_lr: float = setting(7e-5, "Adam learning rate of the gate and the adapter")
  threshold: float = setting(
      0.5, "inference: the adapter's output replaces the module's where the gate is >= threshold")
  seed: int = setting(0, "seed of the gate and adapter initialisation (--seed sets it)")

  def to_editor_dict(self):
    """The `editor.*` settings (reference names), for metrics.json."""
    return to_flat(self)


@dataclasses.dataclass(frozen=True)
class DeferSettings(Settings):
  """Every setting DEFER reads."""

  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  editor: DeferEditorSettings = DeferEditorSettings()
  eval: CodebookEval = CodebookEval()


def from_resolved(resolved, config) -> DeferEditorSettings:
  """The editor settings of a resolved `defer` run, the wrapped layer filled in."""
  editor = resolved.typed.editor
  return editor if editor.layer else dataclasses.replace(editor, layer=default_layer(config))


class DeferState(NamedTuple):
  """DEFER's arrays (float32) and counters.

  Attributes:
    params: {"gate_w" [d_in], "gate_b" [], "value_w" [d_in, d_out], "value_b" [d_out]}.
    trained: False until the first edit (the wrapped module then returns its own output).
    n_edits: edits applied so far.
  """

  params: dict
  trained: jax.Array
  n_edits: jax.Array


def init(settings: DeferEditorSettings, d_in: int, d_out: int, sharding=None) -> DeferState:
  """Fresh gate and adapter, each entry uniform in +-1/sqrt(d_in) (torch's `nn.Linear` init).

  Args:
    settings: editor settings (`seed`).
    d_in, d_out: the wrapped module's widths.
    sharding: optional sharding of `value_w` (e.g. the wrapped kernel's, on a mesh).
  """
  bound = 1.0 / math.sqrt(d_in)
  k = jax.random.split(jax.random.PRNGKey(settings.seed), 4)
  u = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  params = {"gate_w": u(k[0], (d_in,)), "gate_b": u(k[1], ()), "value_w": u(k[2], (d_in, d_out)),
            "value_b": u(k[3], (d_out,))}
  if sharding is not None:
    params["value_w"] = jax.device_put(params["value_w"], sharding)
  return DeferState(params, jnp.asarray(False), jnp.asarray(0, jnp.int32))


def gate(params: dict, q_BxD: jax.Array) -> jax.Array:
  """sigmoid(q . w_g + b_g) per row [B] (float32)."""
  return jax.nn.sigmoid(q_BxD.astype(jnp.float32) @ params["gate_w"] + params["gate_b"])


def values(params: dict, q_BxD: jax.Array) -> jax.Array:
  """q W_v + b_v per row [B, d_out] (float32)."""
  return q_BxD.astype(jnp.float32) @ params["value_w"] + params["value_b"][None, :]


def soft_output(params: dict, q_BxD, y_BxTxD) -> jax.Array:
  """Training output: g v + (1 - g) y at every position [B, T, d_out] (float32)."""
  g = gate(params, q_BxD)[:, None, None]
  return g * values(params, q_BxD)[:, None, :] + (1.0 - g) * y_BxTxD.astype(jnp.float32)


def hard_output(params: dict, trained, threshold, q_BxD, y_BxTxD) -> jax.Array:
  """Inference output: v where g >= threshold (and the editor is trained), else y [B, T, d_out]."""
  fire = trained & (gate(params, q_BxD) >= threshold)
  v = values(params, q_BxD)[:, None, :].astype(y_BxTxD.dtype)
  return jnp.where(fire[:, None, None], v, y_BxTxD)


def _query(x_BxTxD, last_B):
  return jnp.take_along_axis(x_BxTxD, last_B[:, None, None], axis=1)[:, 0]


class EditInfo(NamedTuple):
  """Per-edit numbers (device scalars).

  Attributes:
    loss_first: CE before training; loss_last: after the last Adam step.
    gate: the gate on the edit's own sequence after training.
    edit_acc: teacher-forced token accuracy of the edit right after it (the hard gate: its ES).
  """

  loss_first: jax.Array
  loss_last: jax.Array
  gate: jax.Array
  edit_acc: jax.Array


@functools.partial(jax.jit, static_argnames=("settings",))
def _edit_jit(model, state, input_ids_BxT, attention_mask_BxT, labels_BxT, lr, threshold, *,
              settings):
  ids, mask, labels, last = full_sequence(input_ids_BxT, attention_mask_BxT, labels_BxT)
  io = layer_io(model, settings.layer, ids, mask)
  q = _query(io.x, last)  # fixed: the layers below the wrapped module never change

  def loss_fn(params):
    logits = logits_with_output(model, settings.layer, io, mask,
                                lambda x, y: soft_output(params, q, y))
    return token_ce(logits, labels)

  opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr)

  def step(carry, _):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (state.params, opt.init(state.params)), None,
                                     length=settings.n_iter)
  trained = jnp.asarray(True)
  logits = logits_with_output(model, settings.layer, io, mask,
                              lambda x, y: hard_output(params, trained, threshold, q, y))
  info = EditInfo(losses[0], loss_fn(params), gate(params, q)[0], row_acc(logits, labels)[0])
  return DeferState(params, trained, state.n_edits + 1), info


def edit_step(model: Model, state: DeferState, batch: EditBatch, row: int,
              settings: DeferEditorSettings) -> tuple[DeferState, EditInfo]:
  """Applies row `row` of a right-padded batch as one edit (one compiled program, no host sync)."""
  s = slice(row, row + 1)
  return _edit_jit(model, state, jnp.asarray(batch.input_ids[s]), jnp.asarray(batch.attention_mask[s]),
                   jnp.asarray(batch.labels[s]), jnp.float32(settings.edit_lr),
                   jnp.float32(settings.threshold), settings=_jit_key(settings))


def _jit_key(settings: DeferEditorSettings) -> DeferEditorSettings:
  """The static part: the learning rate and threshold travel as traced scalars."""
  base = DeferEditorSettings()
  return dataclasses.replace(settings, edit_lr=base.edit_lr, threshold=base.threshold)


def apply_edits(model: Model, state: DeferState, batch: EditBatch, settings: DeferEditorSettings,
                *, progress: bool = False) -> tuple[DeferState, list[dict]]:
  """Applies every row of `batch` as an edit, in order; per-edit info is fetched once at the end.

  Returns:
    (new state, per-edit info dicts with Python scalars).
  """
  from tqdm.auto import tqdm  # noqa: PLC0415
  pending = []
  for row in tqdm(range(batch.input_ids.shape[0]), desc="defer edits", disable=not progress,
                  unit="edit"):
    state, info = edit_step(model, state, batch, row, settings)
    pending.append(info)
  host = jax.device_get(pending)
  return state, [{k: float(np.asarray(v)) for k, v in info._asdict().items()} for info in host]


def _adapter(state: DeferState, threshold):
  def adapter_for(mask, last):
    del mask
    return lambda x_in, y_out: hard_output(state.params, state.trained, threshold,
                                           _query(x_in, last), y_out)
  return adapter_for


@functools.partial(jax.jit, static_argnames=("layer",))
def _logits_jit(model, state, input_ids, attention_mask, labels, threshold, *, layer):
  return scored_logits(model, layer, (input_ids, attention_mask, labels), _adapter(state, threshold))


@functools.partial(jax.jit, static_argnames=("layer", "max_new_tokens"))
def _generate_jit(model, state, input_ids, attention_mask, threshold, *, layer, max_new_tokens):
  return greedy_whole(model, layer, input_ids, attention_mask, max_new_tokens,
                      _adapter(state, threshold))


def logits_fn(model: Model, state: DeferState, settings: DeferEditorSettings):
  """EditBatch -> logits [B, T, V] of the edited model (the gate decides on the full sequence)."""
  thr = jnp.float32(settings.threshold)
  return lambda batch: _logits_jit(model, state, jnp.asarray(batch.input_ids),
                                   jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels), thr,
                                   layer=settings.layer)


def generate_fn(model: Model, state: DeferState, settings: DeferEditorSettings):
  """(left-padded ids, mask, max_new_tokens) -> greedy tokens [B, N] of the edited model."""
  thr = jnp.float32(settings.threshold)
  return lambda ids, mask, n: _generate_jit(model, state, jnp.asarray(ids), jnp.asarray(mask), thr,
                                            layer=settings.layer, max_new_tokens=int(n))


def check_layer(model: Model, settings) -> tuple[int, int]:
  """(d_in, d_out) of the wrapped module (UserError when the model has no such module)."""
  from horse_jax.models import names  # noqa: PLC0415
  names.check_module_names(model.config, (settings.layer,))
  kernel = names.get_kernel(model.params, settings.layer)
  if kernel.ndim != 2:
    raise UserError(f"editor.layer {settings.layer}: not a linear module")
  return int(kernel.shape[0]), int(kernel.shape[1])


class DeferModel(NamedTuple):
  """The edited model: the base model (never changed) plus DEFER's state."""

  model: Model
  state: DeferState
  settings: DeferEditorSettings

  def logits(self, batch) -> jax.Array:
    """EditBatch -> logits [B, T, V] (see `logits_fn`)."""
    return logits_fn(self.model, self.state, self.settings)(batch)

  def generate(self, input_ids_BxT, attention_mask_BxT, max_new_tokens: int) -> jax.Array:
    """Greedy tokens [B, N] of left-padded prompts (see `generate_fn`)."""
    return generate_fn(self.model, self.state, self.settings)(input_ids_BxT, attention_mask_BxT,
                                                             max_new_tokens)


def plan_program(model: Model, resolved, mesh, seq_len: int, n_edits: int):
  """The program one DEFER edit runs, for `horse-jax plan`: (jitted fn, abstract args, kwargs,
  description, info). `model` holds abstract parameters laid out on `mesh`."""
  del n_edits  # every edit runs the same program; the state does not grow
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from horse_jax.models import names  # noqa: PLC0415
  cfg = from_resolved(resolved, model.config)
  d_in, d_out = check_layer(model, cfg)
  rep = NamedSharding(mesh, P())
  kernel = names.get_kernel(model.params, cfg.layer)
  state = jax.eval_shape(lambda: init(cfg, d_in, d_out))
  shard = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  # The adapter's matrix is laid out as the wrapped kernel (as `init` places it on a mesh).
  params = {k: shard(v, (getattr(kernel, "sharding", None) or rep) if k == "value_w" else rep)
            for k, v in state.params.items()}
  state = DeferState(params, shard(state.trained, rep), shard(state.n_edits, rep))
  tok = jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=rep)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  args = (model, state, tok, tok, tok, scalar, scalar)
  what = f"one defer edit: {cfg.n_iter} Adam steps on {seq_len} tokens at {cfg.layer}"
  return _edit_jit, args, {"settings": _jit_key(cfg)}, what, {"layer": cfg.layer, "seq_len": seq_len}
