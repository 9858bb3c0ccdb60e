"""Keys and target vectors of ROME / MEMIT / AlphaEdit: jitted forward passes over `Rows`.

Keys: the edited module's input at each row's subject-last token (`subject_keys`).

Targets (`optimise_delta`): a vector delta added to the residual stream leaving decoder layer L at
each row's subject-last token, optimised with Adam (optax.adam, the reference's torch.optim.Adam
defaults) on

  loss(delta) = mean over rewrite rows of (NLL of the target tokens) / len(target)
              + kl_factor * KL(current || initial) of the next-token distribution at the KL row's
                subject-last token ("{subject} is a")
              + v_weight_decay * |delta| / |target_init|^2          (the norm is not squared)

for at most `v_num_grad_steps - 1` steps: the reference stops when the loss drops below 5e-2, and its
last iteration only evaluates. After each step delta is clamped to clamp_norm_factor * |target_init|.
Here the loop is one `lax.fori_loop` whose early stop is a `done` flag that freezes delta and the
optimizer state (no host sync). ROME's reference adds delta to the MLP output of layer L and MEMIT's
to the decoder layer's output: in every supported architecture the MLP output is the last term added
to the residual stream of its layer, so both are this same sum; they differ in `target_init` (ROME:
the MLP output at the bare prompt; MEMIT/AlphaEdit: the layer's output there). The layers below L+1
never see delta, so they run once, outside the loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from horse_jax.models import names
from horse_jax.models.hooks import Hooks, Tap
from horse_jax.models.transformer import arch, default_positions, embed, run_layers

EARLY_STOP = 5e-2


class ZHyper(NamedTuple):
  """The traced floats of the target optimisation (changing them does not recompile)."""

  v_lr: jax.Array
  v_weight_decay: jax.Array
  clamp_norm_factor: jax.Array
  kl_factor: jax.Array


def safe_norm(x):
  """|x| with gradient 0 at x = 0 (torch's subgradient; jnp.linalg.norm's is NaN there)."""
  sq = jnp.sum(x * x)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _gather(x_RxTxD, lookup_R):
  return jnp.take_along_axis(x_RxTxD, lookup_R[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("module", "layer"))
def subject_keys(model, input_ids, attention_mask, lookup, module: str, layer: int):
  """(keys [R, d_in], layer output [R, D]) at each row's lookup token: the input of `module`
  (in decoder layer `layer`) and the residual stream leaving that layer, float32."""
  positions = default_positions(attention_mask)
  tap = Tap(Hooks(capture=(module,)))
  h = run_layers(model, embed(model, input_ids, positions), attention_mask, positions, tap, 0,
                 layer + 1)
  keys = _gather(tap.captured[module], lookup).astype(jnp.float32)
  return keys, _gather(h, lookup).astype(jnp.float32)


def module_output(model, module: str, x):
  """`module`'s output for inputs x [..., d_in] (float32)."""
  params = names.get_module(model.params, module)
  y = jnp.matmul(x, params["kernel"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  if "bias" in params:
    y = y + params["bias"].astype(jnp.float32)
  return y


@functools.partial(jax.jit, static_argnames=("module", "layer", "loss_layer", "n_rewrites", "steps",
                                             "init_at_mlp"))
def optimise_delta(model, input_ids, attention_mask, lookup, labels, n_target, hyper: ZHyper, *,
                   module: str, layer: int, loss_layer: int, n_rewrites: int, steps: int,
                   init_at_mlp: bool):
  """The optimised delta at the output of decoder layer `layer`.

  Args:
    model: the (current) Model.
    input_ids, attention_mask, lookup, labels: the request's z rows (`requests.Request.z_rows`):
      the rewrite rows first (row 0 the bare prompt), then the KL rows.
    n_target: number of target tokens (float scalar).
    hyper: the traced floats.
    module: the edited module of `layer` (for ROME's target_init, the MLP output).
    layer: the decoder layer whose output receives delta.
    loss_layer: the decoder layer whose output gives the NLL logits (>= layer, < num_layers).
    n_rewrites: the number of rewrite rows.
    steps: `v_num_grad_steps`.
    init_at_mlp: ROME (target_init = the MLP output) or MEMIT/AlphaEdit (the layer's output).

  Returns:
    (delta [D], target_init [D], loss at the last evaluation, steps taken).
  """
  cfg = model.config
  head = arch(cfg).head
  positions = default_positions(attention_mask)
  tap = Tap(Hooks(capture=(module,)))
  h_RxTxD = run_layers(model, embed(model, input_ids, positions), attention_mask, positions, tap,
                       0, layer + 1)
  if init_at_mlp:
    target_init = module_output(model, module, _gather(tap.captured[module], lookup)[0]
                                .astype(jnp.float32))
  else:
    target_init = _gather(h_RxTxD, lookup)[0].astype(jnp.float32)
  at_RxT = (jnp.arange(input_ids.shape[1])[None, :] == lookup[:, None]).astype(h_RxTxD.dtype)
  valid = (labels >= 0)
  safe_labels = jnp.where(valid, labels, 0)

  def logits_of(delta):
    h = h_RxTxD + at_RxT[..., None] * delta.astype(h_RxTxD.dtype)[None, None, :]
    h = run_layers(model, h, attention_mask, positions, Tap(None), layer + 1, loss_layer + 1)
    nll_logits = head(model.params, cfg, h[:n_rewrites], Tap(None))
    if loss_layer + 1 < cfg.num_layers:  # the KL term reads the final logits
      h = run_layers(model, h, attention_mask, positions, Tap(None), loss_layer + 1, cfg.num_layers)
    kl_logits = _gather(head(model.params, cfg, h[n_rewrites:], Tap(None)), lookup[n_rewrites:])
    return nll_logits.astype(jnp.float32), jax.nn.log_softmax(kl_logits.astype(jnp.float32), -1)

  _, kl_init = logits_of(jnp.zeros_like(target_init))
  init_norm = jnp.linalg.norm(target_init)

  def loss_fn(delta):
    nll_logits, kl_lp = logits_of(delta)
    lp = jax.nn.log_softmax(nll_logits, -1)
    picked = jnp.take_along_axis(lp, safe_labels[:n_rewrites, :, None], axis=-1)[..., 0]
    nll = jnp.mean(-jnp.sum(picked * valid[:n_rewrites], axis=1) / n_target)
    kl = jnp.sum(jnp.exp(kl_lp) * (kl_lp - kl_init)) / kl_lp.shape[0]
    decay = hyper.v_weight_decay * safe_norm(delta) / init_norm ** 2
    return nll + hyper.kl_factor * kl + decay

  opt = optax.adam(hyper.v_lr)
  max_norm = hyper.clamp_norm_factor * init_norm

  def body(_, carry):
    delta, state, done, taken = carry
    loss, grad = jax.value_and_grad(loss_fn)(delta)
    done = done | (loss < EARLY_STOP)
    updates, new_state = opt.update(grad, state, delta)
    new = delta + updates
    norm = safe_norm(new)
    new = jnp.where(norm > max_norm, new * (max_norm / jnp.where(norm > 0, norm, 1.0)), new)
    keep = lambda old, fresh: jnp.where(done, old, fresh)  # noqa: E731
    return (keep(delta, new), jax.tree_util.tree_map(keep, state, new_state), done,
            taken + (~done).astype(jnp.int32))

  delta0 = jnp.zeros_like(target_init)
  carry = (delta0, opt.init(delta0), jnp.asarray(False), jnp.asarray(0, jnp.int32))
  delta, _, _, taken = jax.lax.fori_loop(0, steps - 1, body, carry)
  return delta, target_init, loss_fn(delta), taken
