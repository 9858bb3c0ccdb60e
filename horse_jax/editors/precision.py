"""Full float32 matrix products for the editors' decisions and statistics (`exact` regions).

A float32 matmul at JAX's default precision is not a float32 matmul everywhere: on TPU it is one
bfloat16 pass (8 mantissa bits), on Ampere/Hopper GPUs TF32 (10 bits). That is fine for the LM
forward (trained that way, and most of the FLOPs), not for what an editor decides or solves with:
a cosine compared with a 0.85 threshold, a Hopfield logit scaled by beta = 20 (an input error of
1e-3 moves a softmax weight by 2 %), a ridge solve of K^T K, the normalizer's mean and variance.
Those products run at `Precision.HIGHEST` (float32 accumulation of float32 products: six bfloat16
passes on TPU, no TF32 on GPU). On CPU every precision is float32 already.

How: a region of editor code runs under `exact(fn)` (a decorator) or `with exact_region():`,
which sets `jax.default_matmul_precision("highest")` while JAX traces it, so every dot / einsum /
matmul inside, including those of `lax.scan` / `fori_loop` bodies and their transposes (the
meta-backward), is lowered with precision HIGHEST without a `precision=` argument on each product,
and a `jax.named_scope(SCOPE)` names it, so the lowered program says which products are the exact
ones (`tests/test_precision.py` checks both from the HLO). A region must never contain an LM
forward: the models keep the fast default, and the hooks they call (the codebook adapter) open
their own region around the lookup only. Products already written with `precision=HIGHEST` keep it.
"""

from __future__ import annotations

import contextlib
import functools

import jax

HIGHEST = jax.lax.Precision.HIGHEST
SCOPE = "exact_f32"  # the named scope of every exact region (visible in the HLO's op names)


@contextlib.contextmanager
def exact_region():
  """A region whose matrix products are traced at `Precision.HIGHEST`, named `SCOPE`."""
  with jax.named_scope(SCOPE), jax.default_matmul_precision("highest"):
    yield


def exact(fn):
  """`fn` traced as an `exact_region` (a decorator)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with exact_region():
      return fn(*args, **kwargs)

  return wrapped
