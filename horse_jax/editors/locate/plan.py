"""The programs a ROME / MEMIT / AlphaEdit run executes, for `horse-jax plan`.

  statistics  `stats._batch_moments`: one corpus batch of `stats.TOKENS_PER_BATCH` tokens through the
              layers up to the last edited one, sum of k k^T [d_in, d_in] per edited module
  target      `targets.optimise_delta`: one request's v_num_grad_steps Adam steps on delta (the
              rewrite rows, one per context template, and the KL row)
  solve       one module's closed form on C [d_in, d_in] (ROME: u = C^-1 k; MEMIT: (lambda C +
              K K^T)^-1 K R; AlphaEdit: solve(P (K K^T + cache) + L2 I, P K R)); the editor runs these
              op by op, so the plan compiles the same operations as one program
C, the projector and AlphaEdit's cache are replicated over the mesh, as `editor.prepare` places them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.editors.locate import editor as locate, solve, stats
from horse_jax.editors.locate.targets import ZHyper, optimise_delta
from horse_jax.models import names
from horse_jax.models.names import layer_index


def _rome_left(cov, key_mean):
  return solve.rome_left(key_mean, cov)


def programs(model, method: str, resolved, mesh, seq_len: int):
  """[(stage name, jitted fn, abstract args, static kwargs, description)] and the plan's info.

  Args:
    model: the Model with abstract parameters laid out on `mesh`.
    method: rome | memit | alphaedit.
    resolved: the run's resolved settings.
    mesh: the (data, model) mesh.
    seq_len: tokens of one padded edit row (and of one statistics row).
  """
  cfg = resolved.typed.editor
  modules = locate.modules_of(cfg, model.config)
  rep = NamedSharding(mesh, P())
  abstract = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
  d_in, d_out = (int(n) for n in names.get_kernel(model.params, modules[-1]).shape)
  out = []

  if locate.needs_covariance(cfg):
    rows = max(1, stats.TOKENS_PER_BATCH // seq_len)
    rows = 1 << (rows.bit_length() - 1)  # `stats.corpus_batches` pads to a power of two
    tok = abstract((rows, seq_len), jnp.int32)
    stop = max(layer_index(m) for m in modules) + 1
    out.append(("statistics", stats._batch_moments, (model, tok, tok),
                {"modules": modules, "stop": stop},
                f"sum of k k^T at {len(modules)} module(s) over one corpus batch ({rows} x {seq_len} "
                "tokens; the corpus runs as many such batches)"))

  n_rewrites = 1 + len(cfg.context_templates)
  n_rows = n_rewrites + 1
  layer = max(cfg.layers)  # MEMIT/AlphaEdit's z layer; ROME's last (largest) optimisation
  loss_layer = min(max(cfg.v_loss_layer, layer), model.config.num_layers - 1)
  tok = abstract((n_rows, seq_len), jnp.int32)
  hyper = ZHyper(*(abstract(()) for _ in ZHyper._fields))
  out.append(("target", optimise_delta,
              (model, tok, tok, abstract((n_rows,), jnp.int32), tok, abstract(()), hyper),
              {"module": cfg.module(layer), "layer": layer, "loss_layer": loss_layer,
               "n_rewrites": n_rewrites, "steps": cfg.v_num_grad_steps,
               "init_at_mlp": method == "rome"},
              f"one request's target: {cfg.v_num_grad_steps} Adam steps on {n_rows} rows of "
              f"{seq_len} tokens at layer {layer}"))

  cov = abstract((d_in, d_in))
  if method == "rome":
    fn, args = _rome_left, (cov, abstract((d_in,)))
    what = f"ROME's left vector u = C^-1 k at one module (C [{d_in}, {d_in}])"
  elif method == "memit":
    fn = solve.memit_shift
    args = (abstract((1, d_in)), abstract((1, d_out)), cov, abstract(()))
    what = f"MEMIT's shift of one module for one request (C [{d_in}, {d_in}])"
  else:
    fn = solve.alphaedit_shift
    args = (abstract((1, d_in)), abstract((1, d_out)), cov, cov, abstract(()))
    what = f"AlphaEdit's projected shift of one module for one request (P, cache [{d_in}, {d_in}])"
  out.append(("solve", jax.jit(fn), args, {}, what))
  # What the run keeps alive across its programs (replicated): C per module, the summed shifts,
  # AlphaEdit's projector and key cache per module.
  per_module = d_in * d_in * 4 * (locate.needs_covariance(cfg) + 2 * (method == "alphaedit")) + d_in * d_out * 4
  info = {"resident_bytes": len(modules) * per_module, "modules": list(modules), "layers": list(cfg.layers), "context_templates": n_rewrites - 1,
          "covariance_bytes": len(modules) * d_in * d_in * 4 if locate.needs_covariance(cfg) else 0,
          "seq_len": seq_len}
  return out, info
