"""WISE (the HoReN reference's `src/models/wise/WISE.py`, WISE-Retrieve) as pure functions.

One linear module (Llama-3-8B `model.layers.29.mlp.down_proj`, kernel W [d_in, d_out]) keeps its
weights; edits go into a *side memory* W_s, a copy of W. Notation: for a module input x_t and a
weight V, the activation distance of a sequence is

  a(V) = mean_t || act(x_t V) - act(x_t W) ||      (act: the model's MLP activation, SiLU for Llama)

over its positions (inference: real tokens; more than 100 of them: the max instead of the mean).

**An edit** (one record) trains W_s on R = (number of context templates) + 1 sequences: the edit's
"prompt target" inside each template, and the record's unrelated prompt. The module computes x W_s
on all of them. Loss = ft + act:
  ft   per template row the target tokens' cross-entropy, summed and divided by (target tokens + 1)
       (the reference's mask starts one position early: "prompt" there is the padded prompt length),
       averaged over the rows;
  act  with in_i = a(W_s) of template row i (pads included) and out = a(W_s) of the unrelated row:
       mean+(out - in_i + gamma) + mean+(out - alpha) + mean+(beta - in_i), mean+ = the mean of the
       positive entries (0 if none).
Each of `n_iter` steps is SGD with weight decay 1e-5 on the masked gradient,
  W_s <- clip(W_s - lr (M * g + 1e-5 W_s), W - c, W + c),
M the shard's random 0/1 mask (`mask_ratio` of the entries), c = `norm_constraint`. The loop stops
early when the previous loss is <= 0.02 and changed by <= 1e-4 (before stepping). The edit then
records the mean in-scope distance of its last forward; the side memory's threshold is
`act_ratio` x the smallest such value of its edits.

**Memories.** Every `save_freq` edits W_s is stored (with its smallest activation) and a fresh
copy of W (and a new mask) starts; every `merge_freq` edits the last merge_freq/save_freq stored
memories are merged into one by TIES (`ties_merge`), with the smallest of their activations.

**Retrieval** (inference), once per sequence: start from W if a(W_s) < threshold of W_s, else
W_s; then for each stored memory i in order, take it if a(W_i) > the best activation so far and
> its threshold. The chosen weight computes the module output at every position.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.data.tokenize import IGNORE
from horse_jax.editors.whole_sequence import layer_io, logits_with_output
from horse_jax.models import Model
from horse_jax.models.layers import activation

NO_EDIT = 1e9  # the reference's starting "smallest activation" of a memory without edits
WEIGHT_DECAY = 1e-5  # torch.optim.SGD(weight_decay=1e-5) in the reference


class WiseState(NamedTuple):
  """WISE's arrays (float32, kernel layout [d_in, d_out]) and counters.

  Attributes:
    side: the side memory being edited.
    side_min_act: smallest in-scope activation of its edits (NO_EDIT before the first).
    mask: its shard's 0/1 gradient mask.
    memories: stored side memories [M, d_in, d_out].
    memory_min_act: their smallest activations [M].
    n_edits: edits applied so far (host int).
    merges: merges done so far (host int).
    rng: numpy RandomState state of the next mask draw (host tuple).
  """

  side: jax.Array
  side_min_act: jax.Array
  mask: jax.Array
  memories: jax.Array
  memory_min_act: jax.Array
  n_edits: int
  merges: int
  rng: tuple


def draw_mask(rng: tuple, mask_ratio: float, d_in: int, d_out: int) -> tuple[np.ndarray, tuple]:
  """One shard's gradient mask, drawn as the reference draws it (`np.random.choice([1, 0],
  p=[r, 1 - r])` over the torch weight [d_out, d_in] flattened), from the RandomState `rng`.

  Returns:
    (mask [d_in, d_out] float32 in kernel layout, the RandomState's next state).
  """
  rs = np.random.RandomState()
  rs.set_state(rng)
  flat = rs.choice([1, 0], size=d_out * d_in, p=[mask_ratio, 1 - mask_ratio])
  return flat.reshape(d_out, d_in).T.astype(np.float32), rs.get_state()


def init(kernel: jax.Array, settings, mask: np.ndarray | None = None) -> WiseState:
  """A fresh WISE state for the module whose kernel [d_in, d_out] is `kernel`.

  Args:
    kernel: the wrapped module's weights (never changed).
    settings: `WiseEditorSettings` (`seed`, `mask_ratio`).
    mask: an explicit first mask [d_in, d_out] (default drawn from `seed`).
  """
  d_in, d_out = kernel.shape
  rng = np.random.RandomState(settings.seed).get_state()
  if mask is None:
    mask, rng = draw_mask(rng, settings.mask_ratio, d_in, d_out)
  side = jnp.asarray(kernel, jnp.float32)
  return WiseState(side, jnp.float32(NO_EDIT), jnp.asarray(mask, jnp.float32),
                   jnp.zeros((0, d_in, d_out), jnp.float32), jnp.zeros((0,), jnp.float32), 0, 0,
                   rng)


def distances(x_RxTxD, kernel, weight, act_name: str) -> jax.Array:
  """Per-token activation distances [R, T]: || act(x V) - act(x W) || (float32)."""
  x = x_RxTxD.astype(jnp.float32)
  # x V = x W + x (V - W), and an output whose change is exactly 0 differs by exactly 0: equal
  # weights give distance 0 (as the reference's two identical linear calls), whatever the compiler
  # fuses (two fused activations need not round alike).
  k = kernel.astype(jnp.float32)
  base = x @ k
  change = x @ (weight.astype(jnp.float32) - k)
  diff = jnp.where(change == 0, 0.0, activation(act_name, base + change) - activation(act_name, base))
  sq = jnp.sum(jnp.square(diff), axis=-1)
  # The norm's gradient at a zero difference is 0 (torch.norm's), not NaN: a fresh side memory
  # equals W, so every distance of an edit's first step is 0.
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def sequence_activation(dist_BxT, mask_BxT, infer: bool = True) -> jax.Array:
  """a(V) per sequence [B] from per-token distances: the mean over the positions in `mask`, or at
  inference (`infer`) their max when there are more than 100 (the reference's rule)."""
  valid = mask_BxT != 0
  n = jnp.sum(valid, axis=1)
  mean = jnp.sum(jnp.where(valid, dist_BxT, 0.0), axis=1) / jnp.maximum(n, 1)
  if not infer:
    return mean
  top = jnp.max(jnp.where(valid, dist_BxT, -jnp.inf), axis=1)
  return jnp.where(n > 100, top, mean)


def route(x_BxTxD, mask_BxT, kernel, side, side_thr, memories, memory_thr, act_name: str):
  """Which weight each sequence uses: -1 = the original W, 0 = the side memory, i + 1 = stored
  memory i (see the module docstring). Returns (choice [B], best activation [B])."""
  act = lambda w: sequence_activation(distances(x_BxTxD, kernel, w, act_name), mask_BxT)
  best = act(side)
  choice = jnp.where(best >= side_thr, 0, -1)
  for i in range(memories.shape[0]):
    a = act(memories[i])
    better = (a > best) & (a > memory_thr[i])
    choice = jnp.where(better, i + 1, choice)
    best = jnp.where(better, a, best)
  return choice, best


def routed_output(x_BxTxD, y_BxTxD, mask_BxT, kernel, state: WiseState, act_ratio, act_name):
  """The module output [B, T, d_out] with each sequence's chosen weight at every position."""
  choice, _ = route(x_BxTxD, mask_BxT, kernel, state.side, state.side_min_act * act_ratio,
                    state.memories, state.memory_min_act * act_ratio, act_name)
  x = x_BxTxD.astype(jnp.float32)
  out = y_BxTxD.astype(jnp.float32)
  weights = [state.side] + [state.memories[i] for i in range(state.memories.shape[0])]
  for i, w in enumerate(weights):
    out = jnp.where((choice == i)[:, None, None], x @ w, out)
  return out.astype(y_BxTxD.dtype)


def _positive_mean(z):
  """torch's mean(z[z > 0]) (0 when no entry is positive)."""
  pos = z > 0
  return jnp.sum(jnp.where(pos, z, 0.0)) / jnp.maximum(jnp.sum(pos), 1)


def activation_loss(in_R, out_1, alpha, beta, gamma) -> jax.Array:
  """The reference's margin loss on in-scope [R] and out-of-scope [1] activations."""
  return (_positive_mean(out_1[:, None] - in_R[None, :] + gamma) + _positive_mean(out_1 - alpha)
          + _positive_mean(beta - in_R))


def ft_loss(logits_RxTxV, labels_RxT, frame_start) -> jax.Array:
  """The reference's target loss: per row, the shifted CE summed over positions from C - 2 on (C =
  ignored labels in the row's frame, which starts at `frame_start`), divided by their count;
  averaged over rows."""
  logp = jax.nn.log_softmax(logits_RxTxV[:, :-1].astype(jnp.float32), axis=-1)
  target = labels_RxT[:, 1:]
  valid = target != IGNORE
  ce = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, ce, 0.0)
  t = labels_RxT.shape[1]
  in_frame = jnp.arange(t)[None, :] >= frame_start
  ignored = jnp.sum((labels_RxT == IGNORE) & in_frame, axis=1)
  start = frame_start + ignored - 2
  counted = jnp.arange(t - 1)[None, :] >= start[:, None]
  return jnp.mean(jnp.sum(ce * counted, axis=1) / jnp.maximum(jnp.sum(counted, axis=1), 1))


def sgd_step(side, grad, mask, kernel, lr, norm_constraint):
  """One masked SGD step with weight decay 1e-5 (reaching masked-out entries too), then the clamp
  to the original +- norm_constraint."""
  new = side - lr * (mask * grad + WEIGHT_DECAY * side)
  k = kernel.astype(jnp.float32)
  return jnp.clip(new, k - norm_constraint, k + norm_constraint)


class EditInfo(NamedTuple):
  """Per-edit numbers (device scalars): first and last loss, SGD steps taken, the recorded in-scope
  activation, and the target-token accuracy of the plain template row with the side memory on."""

  loss_first: jax.Array
  loss_last: jax.Array
  steps: jax.Array
  activation: jax.Array
  edit_acc: jax.Array


class Hyper(NamedTuple):
  """The traced floats of an edit (a sweep over them reuses the program)."""

  edit_lr: jax.Array
  norm_constraint: jax.Array
  alpha: jax.Array
  beta: jax.Array
  gamma: jax.Array


@functools.partial(jax.jit, static_argnames=("layer", "n_iter", "act_name"))
def edit_program(model: Model, side, side_min_act, mask, ids_RxT, attn_RxT, labels_RxT, frame_start,
                 hyper: Hyper, *, layer: str, n_iter: int, act_name: str):
  """One WISE edit of the side memory (rows: templates, then the unrelated prompt; left-padded).

  Returns:
    (new side, new side_min_act, EditInfo).
  """
  from horse_jax.models import names  # noqa: PLC0415
  kernel = names.get_kernel(model.params, layer)
  io = layer_io(model, layer, ids_RxT, attn_RxT)
  t = ids_RxT.shape[1]
  frame = (jnp.arange(t) >= frame_start).astype(jnp.int32)[None, :]
  r = ids_RxT.shape[0]
  frame = jnp.broadcast_to(frame, (r, t))

  def loss_fn(w):
    logits = logits_with_output(model, layer, io, attn_RxT, lambda x, y: x.astype(jnp.float32) @ w)
    ft = ft_loss(logits[:-1], labels_RxT[:-1], frame_start)
    # Training: the mean over the row's frame, its left pads included (as the reference).
    dist = sequence_activation(distances(io.x, kernel, w, act_name), frame, infer=False)
    act = activation_loss(dist[:-1], dist[-1:], hyper.alpha, hyper.beta, hyper.gamma)
    return ft + act, (jnp.mean(dist[:-1]), logits[0])

  def step(carry, i):
    w, pre, val, done, rec, last = carry
    (loss, (in_mean, _)), grad = jax.value_and_grad(loss_fn, has_aux=True)(w)
    stop = ~done & (jnp.abs(val - pre) <= 1e-4) & (val <= 0.02)
    rec = jnp.where(~done & (stop | (i == n_iter - 1)), in_mean, rec)
    done = done | stop
    w = jnp.where(done, w, sgd_step(w, grad, mask, kernel, hyper.edit_lr, hyper.norm_constraint))
    pre, val = jnp.where(done, pre, val), jnp.where(done, val, loss)
    last = jnp.where(done, last, loss)
    return (w, pre, val, done, rec, last), (loss, ~done)

  init = (side, jnp.float32(0.0), jnp.float32(NO_EDIT), jnp.asarray(False), jnp.float32(NO_EDIT),
          jnp.float32(0.0))
  (w, _, _, _, rec, last), (losses, stepped) = jax.lax.scan(step, init, jnp.arange(n_iter))
  _, (_, logits0) = loss_fn(w)
  lab = labels_RxT[0]
  valid = lab[1:] != IGNORE
  hit = (jnp.argmax(logits0[:-1], axis=-1) == lab[1:]) & valid
  acc = jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)
  info = EditInfo(losses[0], last, jnp.sum(stepped), rec, acc)
  return w, jnp.minimum(side_min_act, rec), info


@jax.jit
def ties_merge(base, tensors_NxIxO, weights_N, density):
  """TIES merge (the reference's GTA("magnitude", "sum", normalize=True)) of N weights into one.

  Each delta_i = W_i - base keeps its int(density x size) largest-magnitude entries; the weighted
  deltas w_i delta_i vote a sign per entry (sign of their sum, ties positive); entries agreeing
  with it are summed and divided by the sum of their weights (1 where none agree).
  """
  deltas = tensors_NxIxO.astype(jnp.float32) - base.astype(jnp.float32)[None]
  n = deltas[0].size
  k = jnp.maximum(jnp.floor(density * n).astype(jnp.int32), 1)
  mags = jnp.abs(deltas).reshape(deltas.shape[0], -1)
  kth = jnp.take_along_axis(jnp.sort(mags, axis=1), (n - k) * jnp.ones((deltas.shape[0], 1),
                                                                        jnp.int32), axis=1)
  deltas = jnp.where(jnp.abs(deltas) >= kth.reshape(-1, 1, 1), deltas, 0.0)
  w = weights_N.astype(jnp.float32)[:, None, None]
  weighted = deltas * w
  majority = jnp.where(jnp.sum(weighted, axis=0) >= 0, 1.0, -1.0)
  agree = jnp.sign(weighted) == majority[None]
  mixed = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
  divisor = jnp.sum(jnp.where(agree, w, 0.0), axis=0)
  divisor = jnp.where(divisor == 0, 1.0, divisor)
  return base.astype(jnp.float32) + mixed / divisor


def after_edit(state: WiseState, kernel, settings) -> WiseState:
  """The bookkeeping after an edit is counted: store the side memory every `save_freq` edits (a
  fresh copy of W starts), merge the last merge_freq/save_freq stored ones every `merge_freq`."""
  n = state.n_edits
  if n % settings.save_freq == 0:
    state = state._replace(
        memories=jnp.concatenate([state.memories, state.side[None]]),
        memory_min_act=jnp.concatenate([state.memory_min_act, state.side_min_act[None]]),
        side=jnp.asarray(kernel, jnp.float32), side_min_act=jnp.float32(NO_EDIT))
  if n % settings.merge_freq == 0:
    m = settings.merge_num
    merged = ties_merge(kernel, state.memories[-m:], jnp.full((m,), settings.weights / m),
                        jnp.float32(settings.densities))
    state = state._replace(
        memories=jnp.concatenate([state.memories[:-m], merged[None]]),
        memory_min_act=jnp.concatenate([state.memory_min_act[:-m],
                                        jnp.min(state.memory_min_act[-m:])[None]]),
        side=jnp.asarray(kernel, jnp.float32), merges=state.merges + 1)
  return state
