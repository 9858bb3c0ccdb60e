"""HoReN (normalized Hopfield retrieval over a key-value codebook) and GRACE, as pure functions.

  settings = CodebookSettings(layer="model.layers.29.mlp.down_proj", ...)
  book = init(settings, d_in, d_out)
  book, info = apply_edit(model, book, tokenized_edits, row, settings)   # one sequential edit
  book, infos = apply_edits(model, book, tokenized_edits, settings, block=16, mesh=None)  # in order
  logits = edited_logits(model, book, ids, mask, prompt_len, settings=settings)
  save(folder, book, settings); book, settings = load(folder)

The base model never changes; an edited model is the base checkpoint plus a codebook folder.
"""

from horse_jax.editors.codebook.adapter import make_adapter
from horse_jax.editors.codebook.edit import (DEFAULT_BLOCK, EditInfo, apply_edit, apply_edits,
                                             compile_count, edit_block, edit_step)
from horse_jax.editors.codebook.infer import (edited_generate, edited_logits, generate_fn, hooks_for,
                                              logits_fn)
from horse_jax.editors.codebook.persist import EditedModel, load, load_edited_model, save
from horse_jax.editors.codebook.query import make_query
from horse_jax.editors.codebook.retrieval import retrieve, retrieve_batch
from horse_jax.editors.codebook.settings import CodebookSettings, from_editor_dict
from horse_jax.editors.codebook.state import (Codebook, ensure_room, grow, init, label_key, place,
                                              planned_capacity, shardings)
