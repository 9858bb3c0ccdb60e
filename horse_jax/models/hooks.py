"""Named-module hooks: what the editors need from a forward pass.

A linear module is addressed by its Hugging Face name (`model.layers.26.mlp.down_proj`,
`transformer.h.22.mlp.fc_out`). For a set of such names a forward pass can

  (a) capture their inputs (HORSE keys; HoReN queries),
  (b) add a caller-supplied offset to their outputs; differentiating the loss with respect to a zero
      offset gives the value gradients without touching the weights,
  (c) pass their outputs through a caller-supplied function `fn(x_in, y_out) -> y_out` (the HoReN and
      GRACE codebook adapters).

`Hooks` is plain data built by the caller (usually inside its own jitted function, so the offsets are
traced values); `Tap` is the per-forward object that the architectures call for every linear layer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Adapter = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Hooks:
  """What to do at named linear modules during a forward pass.

  Attributes:
    capture: names whose inputs [B, T, d_in] are returned in `ForwardOutput.captured`.
    offsets: name -> array [B, T, d_out] added to that module's output.
    adapters: name -> fn(x_in [B, T, d_in], y_out [B, T, d_out]) -> new y_out.
  """

  capture: tuple[str, ...] = ()
  offsets: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  adapters: Mapping[str, Adapter] = dataclasses.field(default_factory=dict)

  def names(self) -> set[str]:
    return set(self.capture) | set(self.offsets) | set(self.adapters)


class Tap:
  """Applies `Hooks` at every linear layer of one forward pass and collects captures."""

  def __init__(self, hooks: Hooks | None):
    self.hooks = hooks or Hooks()
    self.captured: dict[str, jax.Array] = {}
    self.seen: set[str] = set()

  def linear(self, name: str, params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """y = x @ kernel (+ bias), with this module's hooks applied.

    Args:
      name: HF module name, e.g. `model.layers.3.mlp.down_proj`.
      params: {"kernel": [d_in, d_out], optional "bias": [d_out]}.
      x: input [..., d_in].

    Returns:
      The (possibly hooked) output [..., d_out].
    """
    self.seen.add(name)
    hooks = self.hooks
    if name in hooks.capture:
      self.captured[name] = x
    kernel = params["kernel"]
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
    if "bias" in params:
      y = y + jnp.expand_dims(params["bias"].astype(y.dtype), range(y.ndim - 1))
    if name in hooks.offsets:
      y = y + hooks.offsets[name].astype(y.dtype)
    if name in hooks.adapters:
      y = hooks.adapters[name](x, y)
    return y
