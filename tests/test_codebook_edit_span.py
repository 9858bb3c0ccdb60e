"""`editor.edit_span`: the reference writes y[p] only; `onward` adds the change at p to t >= p."""

import numpy as np
import jax.numpy as jnp

from horse_jax.editors.codebook.adapter import put_edit
from horse_jax.editors.codebook.settings import CodebookSettings, from_editor_dict


def _case():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(2, 5, 3))
  rows = rng.normal(size=(2, 3))
  p = np.array([1, 3])
  return y, rows, p


def test_default_is_reference_last():
  assert CodebookSettings().edit_span == "last"
  assert from_editor_dict("horen", {}, "model.layers.0.mlp.down_proj").edit_span == "last"


def test_last_changes_only_p():
  y, rows, p = _case()
  out = np.asarray(put_edit(CodebookSettings(), jnp.asarray(y, jnp.float32), jnp.asarray(p),
                            jnp.asarray(rows, jnp.float32)))
  want = y.copy()
  want[0, 1], want[1, 3] = rows[0], rows[1]
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_onward_adds_the_change_at_p_to_later_positions():
  y, rows, p = _case()
  out = np.asarray(put_edit(CodebookSettings(edit_span="onward"), jnp.asarray(y, jnp.float32),
                            jnp.asarray(p), jnp.asarray(rows, jnp.float32)))
  want = y.copy()
  for b in range(2):
    delta = rows[b] - y[b, p[b]]
    for t in range(y.shape[1]):
      if t >= p[b]:
        want[b, t] = y[b, t] + delta
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
