"""Hypernetwork editors: HORSE, MALMEN and MEND as pure functions over explicit state.

Typical use::

  cfg = hypernet.HypernetConfig(method="horse", modules=mods, shapes=hypernet.module_shapes(model.params, mods))
  state = hypernet.init(cfg, jax.random.PRNGKey(0))
  batches = hypernet.edit_batches(tokenizer, records, cfg.lm_batch)
  shifts, state = hypernet.edit(state, model, cfg, batches)
  edited = hypernet.apply(model, shifts)

Meta-training, one compiled program per step (`horse-jax train` does this)::

  memo = hypernet.memo.build(model, tokenizer, train_records, cfg)  # the unedited model's cache, once
  for step in range(n_steps):
    idx = hypernet.data.step_indices(seed, step, len(train_records), n_edits)
    recs = [train_records[i] for i in idx]
    rows = hypernet.memo.step_rows(memo, tokenizer, idx, recs, cfg)
    state, metrics = hypernet.train_step_async(state, model, cfg, *hypernet.data.step_batches(
        tokenizer, recs, cfg), memo_rows=rows, memo=memo)

Modules, each depending only on those listed after it: `editor` (the functions above) -> `memo`
(the training records' cache) -> `program` (the compiled edit / meta-training programs) -> `state`
(init, optimizer), `meta` (decoupled backward) -> `shifts` (hypernetwork, spread, ridge solves) ->
`network`, `normalizer`, `packing` (host-side packing of mini-batches), `config`, `data`.
"""

from horse_jax.editors.hypernet.config import (HypernetConfig, default_settings, from_settings,
                                               module_shapes)
from horse_jax.editors.hypernet.data import edit_batches, loc_batches, rephrase_batches
from horse_jax.editors.hypernet.editor import (apply, check_metrics, edit, revert, train_step,
                                               train_step_async)
from horse_jax.editors.hypernet import memo
from horse_jax.editors.hypernet.packing import Packer
from horse_jax.editors.hypernet.program import edit_program, train_program, train_program_memo
from horse_jax.editors.hypernet.state import HypernetState, init, optimizer
