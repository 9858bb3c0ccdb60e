"""Validation of a hypernetwork during meta-training: edit the validation records at once, score."""

from __future__ import annotations

from horse_jax import runtime
from horse_jax.editors import hypernet


def validate(state, model, tokenizer, cfg, records, max_length, mesh=None):
  """Edits all `records` at once with the hypernetwork in `state` and scores them teacher-forced.

  Args:
    state: the hypernetwork state (its normalizer statistics are updated by the edit).
    model: the unedited Model.
    tokenizer: its tokenizer.
    cfg: the HypernetConfig.
    records: the validation EditRecords.
    max_length: longest tokenized prompt + answer.
    mesh: the mesh the programs run on (None: one device).

  Returns:
    (state after the edit, {"edit_acc", "rephrase_acc", "loc_acc"}).
  """
  from horse_jax.eval.scoring import score_records  # noqa: PLC0415
  shifts, state = hypernet.edit(state, model, cfg,
                                hypernet.edit_batches(tokenizer, records, cfg.lm_batch, max_length),
                                mesh=mesh)
  scores = score_records(records, tokenizer, runtime.logits_fn(hypernet.apply(model, shifts)),
                         progress=False)
  s = scores["summary"]
  return state, {k: s.get(k) for k in ("edit_acc", "rephrase_acc", "loc_acc")}
