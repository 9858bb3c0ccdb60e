"""The program one WISE edit runs, for `horse-jax plan` (abstract inputs on a mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from horse_jax.editors.wise import core
from horse_jax.editors.wise.settings import from_resolved
from horse_jax.models import Model, names

N_TEMPLATES = 11  # '{}' plus the 10 generated templates of the reference


def plan_program(model: Model, resolved, mesh, seq_len: int, n_edits: int):
  """(jitted fn, abstract args, kwargs, description, info) of one edit; the side memory and its
  mask are laid out as the wrapped kernel. Stored memories do not enter an edit (no replay)."""
  del n_edits
  cfg = from_resolved(resolved, model.config)
  names.check_module_names(model.config, (cfg.layer,))
  kernel = names.get_kernel(model.params, cfg.layer)
  rep = NamedSharding(mesh, P())
  like = lambda dtype: jax.ShapeDtypeStruct(kernel.shape, dtype, sharding=getattr(
      kernel, "sharding", None) or rep)
  rows = N_TEMPLATES + 1
  tok = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=rep)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
  hyper = core.Hyper(*(scalar(jnp.float32) for _ in core.Hyper._fields))
  args = (model, like(jnp.float32), scalar(jnp.float32), like(jnp.float32), tok, tok, tok,
          scalar(jnp.int32), hyper)
  kwargs = {"layer": cfg.layer, "n_iter": cfg.n_iter, "act_name": model.config.hidden_act}
  what = (f"one wise edit: {cfg.n_iter} SGD steps on {rows} rows of {seq_len} tokens at "
          f"{cfg.layer}")
  return core.edit_program, args, kwargs, what, {"layer": cfg.layer, "seq_len": seq_len,
                                                 "rows": rows}
