"""Meta-training: the decoupled backward from dLoss/dS to the hypernetwork (step 7).

The LM loss is differentiated only with respect to the shifts S_l (M_l = dLoss/dS_l, one [d_k, d_v]
matrix per module, summed over LM mini-batches), then pulled back to the hypernetwork without ever
holding the whole graph:

  X_l = (K^T K + e^lamda I)^{-1} M_l          (refined Cholesky solve, `shifts.ridge_resolve`)
  dLoss/dD_l = K_l X_l                        [R, d_v], refined on its own (`ridge_resolve_rows`)
  HORSE: through D_l' = D_l - c(D_l) G_{l-1} (D_{l-1}, G_{l-1} constant), by `jax.vjp`
  hypernetwork params: sum over chunks of vjp(chunk -> D_chunk)(dLoss/dD_chunk)   (`lax.scan`)
  MALMEN lamda: -e^lamda * sum(X * S);  HORSE does not train lamda
  MEND: vjp(chunk -> partial S)(M_l) per chunk.

The result equals `jax.grad` of the loss through `shifts.solve_stacked` (tested), but memory is one
chunk's activations plus the [R, d_v] cotangent, not the whole token stream's graph; modules sharing
a hypernetwork run in one `lax.scan` (as in `shifts.solve_stacked`), so one module's factor and
solve are alive at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from horse_jax.editors.hypernet import shifts as shifts_lib
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.precision import exact


def _chunk_vjp(fn, net, xs, cot, acc):
  """acc + sum over chunks of vjp(fn(net, *x_chunk))(cot_chunk) by `lax.scan`."""
  def body(a, inp):
    x, c = inp
    _, vjp = jax.vjp(lambda p: fn(p, *x), net)
    (g,) = vjp(c)
    return jax.tree_util.tree_map(jnp.add, a, g), None
  out, _ = lax.scan(body, acc, (xs, cot))
  return out


@exact  # solves and the hypernetwork's backward: float32 products (horse_jax.editors.precision)
def decoupled_grads_stacked(nets: dict, norms: dict, stacked, solved, dshifts: list,
                            cfg: HypernetConfig, chunk: int, mesh=None) -> dict:
  """dLoss/d(hypernetwork params) from dLoss/dS, one `lax.scan` over the modules of each run.

  Only one module's Cholesky factor (its row-split copy from the forward, or recomputed), solve and
  chunked hypernetwork backward are alive at a time.

  Args:
    nets: shape key -> hypernetwork params.
    norms: shape key -> NormState (constants).
    stacked: the `shifts.Stacked` cache the shifts were predicted from.
    solved: `shifts.Solved` of the forward; its factors may be None (then recomputed here).
    dshifts: per run [M, d_k, d_v] dLoss/dS (`shifts.stack_modules`).
    cfg: editor config.
    chunk: rows per chunk.
    mesh: (`data`, `model`) Mesh or None: X is solved split by row over its devices.

  Returns:
    Gradients with the structure of `nets`.
  """
  grads = jax.tree_util.tree_map(jnp.zeros_like, nets)
  chunks = functools.partial(shifts_lib._chunks, chunk=chunk)
  horse = cfg.method == "horse"
  prev = None
  for r, run in enumerate(shifts_lib.module_runs(cfg)):
    skey = cfg.shape_keys[run[0]]
    net, norm = nets[skey], norms[skey]
    k_run, g_run = stacked.keys[r], stacked.grads[r]
    m_run, spread_run = shifts_lib.run_inputs(cfg, run)
    mm_run = dshifts[r].astype(jnp.float32)
    if cfg.method == "mend":
      def mend_body(acc, xs, norm=norm):
        k, g, mm, m = xs
        cot = jnp.broadcast_to(mm, (k.shape[0] // chunk, *mm.shape))
        fn = lambda p, kc, gc, vc: shifts_lib.chunk_rank_one(p, norm, m, kc, gc, vc)
        return _chunk_vjp(fn, net, (chunks(k), chunks(g), chunks(stacked.valid)), cot, acc), None
      grads[skey], _ = lax.scan(mend_body, grads[skey], (k_run, g_run, mm_run, m_run))
      continue
    if prev is None:
      prev = (jnp.zeros_like(g_run[0]), jnp.zeros_like(g_run[0])) if horse else ()
    f_run = None if solved.factors is None else solved.factors[r]

    def body(carry, xs, net=net, norm=norm):
      acc, prev_dg = carry
      k, g, d, s, mm, m, has_prev, stored = xs
      lam = net["lamda"][m]
      # The factor only preconditions the refined solve (lamda's own gradient is the closed form
      # below).
      factor = shifts_lib.ridge_factor(k, lam, mesh) if stored is None else stored
      x, d_cot = shifts_lib.ridge_resolve_rows(factor, k, mm, lam, mesh)  # K X refined on its own
      if cfg.method == "malmen":
        acc = {**acc, "lamda": acc["lamda"].at[m].add(-jnp.exp(lam) * jnp.sum(x * s))}
      if horse:
        _, vjp = jax.vjp(lambda dd: shifts_lib.spread_one(dd, *prev_dg, cfg.spread, has_prev), d)
        (d_cot,) = vjp(d_cot)
      fn = lambda p, kc, gc: shifts_lib.chunk_diffs(p, norm, m, kc, gc)
      acc = _chunk_vjp(fn, net, (chunks(k), chunks(g)), chunks(d_cot), acc)
      return (acc, (d, g) if horse else ()), None

    xs = (k_run, g_run, solved.diffs[r], solved.shifts[r], mm_run, m_run, spread_run, f_run)
    (grads[skey], prev), _ = lax.scan(body, (grads[skey], prev), xs)
  return grads
