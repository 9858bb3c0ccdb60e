"""The hypernetwork editors' state (hypernetworks, normalizers, Adam) and its optimizer.

  state = init(cfg, key)        fresh (identity) hypernetworks, empty normalizers, fresh Adam state
  opt = optimizer(cfg)          global-norm clip, then Adam: what every meta-training step applies
  with_meta_lr(opt_state, lr)   the same Adam state with another learning rate (no recompile)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.hypernet.network import init_net


class HypernetState(NamedTuple):
  """Everything that changes: hypernetworks and normalizers per shape key, Adam state, step."""

  nets: dict
  norms: dict
  opt_state: optax.OptState
  step: jax.Array


def optimizer(cfg: HypernetConfig) -> optax.GradientTransformation:
  """Global-norm clip to `max_grad_norm`, then Adam whose learning rate `meta_lr` is optimizer state
  (`optax.inject_hyperparams`): a run with another meta_lr reuses the compiled training programs."""
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.inject_hyperparams(optax.adam)(learning_rate=cfg.meta_lr))


def with_meta_lr(opt_state, meta_lr) -> optax.OptState:
  """`opt_state` (of `optimizer`) with the learning rate set to `meta_lr`."""
  clip, adam = opt_state
  return clip, adam._replace(hyperparams={**adam.hyperparams,
                                          "learning_rate": jnp.asarray(meta_lr, jnp.float32)})


def init(cfg: HypernetConfig, key: jax.Array) -> HypernetState:
  """Fresh (identity) hypernetworks, empty normalizers, fresh Adam state.

  Args:
    cfg: editor config (one hypernetwork per shape key of its modules).
    key: PRNG key of the hypernetworks' random down-projections.

  Returns:
    The state at step 0.
  """
  nets, norms = {}, {}
  keys = jax.random.split(key, len(set(cfg.shape_keys)))
  for i, skey in enumerate(dict.fromkeys(cfg.shape_keys)):
    dk, dv = cfg.shapes[cfg.shape_keys.index(skey)]
    n_modules = cfg.shape_keys.count(skey)
    nets[skey] = init_net(keys[i], dk + dv, min(cfg.rank, dk + dv), n_modules, cfg.n_blocks, cfg.lr)
    norms[skey] = normalizer.init(dk + dv)
  return HypernetState(nets, norms, optimizer(cfg).init(nets), jnp.zeros((), jnp.int32))
