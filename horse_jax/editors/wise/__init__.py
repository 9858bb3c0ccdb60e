"""WISE (side memory, gradient masks, activation routing, TIES merges) as pure functions.

  settings = WiseEditorSettings(layer="model.layers.3.mlp.down_proj", save_freq=500, ...)
  state = init(kernel, settings)                  # kernel: the wrapped module's [d_in, d_out]
  state, info = edit_rows(model, state, full_rows, prompt_rows, pad_id, settings)   # one edit
  state, infos = apply_edits(model, state, tokenizer, records, templates, settings)
  logits = logits_fn(model, state, settings)(batch)

`core` holds the math (its docstring states it), `editor` the batches and the edited model.
"""

from horse_jax.editors.wise.core import (EditInfo, WiseState, activation_loss, distances, draw_mask,
                                         init, route, sequence_activation, sgd_step, ties_merge)
from horse_jax.editors.wise.editor import (apply_edits, context_templates, edit_rows, generate_fn,
                                           layout, logits_fn, record_rows, WiseModel)
from horse_jax.editors.wise.settings import WiseEditorSettings, WiseSettings, from_resolved
