"""WISE edits from records, and the edited model's logits / generation (see `core` for the math).

An edit's batch is laid out as the reference's `tokenize`: for each context template T_j the text
T_j.format(prompt + " " + target), then the record's unrelated prompt; every row tokenized with BOS
and left-padded with the pad id to the longest (length L); labels = the ids, with the first P
positions of the template rows masked (P = the longest tokenized T_j.format(prompt): the padded
prompt length) and every pad-id position masked. The pads' own module activations enter the
training distances (as in the reference), and a fully masked pad row attends to every slot, so
the batch keeps the exact length L by default (one compiled program per length); a longer
`length` pads further on the left, with `frame_start` = T - L marking the reference's positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.data.tokenize import IGNORE
from horse_jax.editors.whole_sequence import greedy_whole, scored_logits
from horse_jax.editors.wise import core
from horse_jax.editors.wise.settings import WiseEditorSettings
from horse_jax.errors import UserError
from horse_jax.models import Model

TEMPLATE_PROMPTS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


def context_templates(model: Model, tokenizer) -> list[str]:
  """'{}' plus greedy continuations of 5 and 10 tokens of I / You / Because / Yes / 'Q: ', each
  followed by ' {}' (the reference samples them from the model once per run)."""
  from horse_jax.data.tokenize import padding_id  # noqa: PLC0415
  from horse_jax.models import generate  # noqa: PLC0415
  rows = [list(tokenizer(p)["input_ids"]) for p in TEMPLATE_PROMPTS]
  t = max(map(len, rows))
  pad = padding_id(tokenizer)
  ids = np.array([[pad] * (t - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (t - len(r)) + [1] * len(r) for r in rows], np.int32)
  out = ["{}"]
  for n in TEMPLATE_LENGTHS:
    new = np.asarray(generate(model, jnp.asarray(ids), jnp.asarray(mask), n))
    for r, g in zip(rows, new):
      text = tokenizer.decode(list(r) + [int(x) for x in g], skip_special_tokens=True)
      out.append(text.replace("{", " ").replace("}", " ") + " {}")
  return out


def layout(full_rows: Sequence[Sequence[int]], prompt_rows: Sequence[Sequence[int]], pad_id: int,
           length: int | None = None):
  """The edit batch of token rows (template rows then the unrelated row), see the module docstring.

  Returns:
    (ids [R, T], attention mask [R, T], labels [R, T], frame_start) as NumPy int32.
  """
  big = max(map(len, full_rows))
  p = max(map(len, prompt_rows))
  t = length or big
  r = len(full_rows)
  ids = np.full((r, t), pad_id, np.int32)
  mask = np.zeros((r, t), np.int32)
  for i, row in enumerate(full_rows):
    ids[i, t - len(row):] = row
    mask[i, t - len(row):] = 1
  labels = ids.copy()
  start = t - big
  labels[:, :start] = IGNORE
  labels[:len(prompt_rows), start:start + p] = IGNORE
  labels[ids == pad_id] = IGNORE
  return ids, mask, labels, start


def record_rows(tokenizer, record, templates: Sequence[str]):
  """(full rows, prompt rows) of a record: the templated "prompt target" and the unrelated prompt."""
  loc = record.loc_prompt
  if not loc:
    raise UserError(f"WISE needs each record's unrelated (locality) prompt; {record.prompt!r} has none")
  enc = lambda s: list(tokenizer(s)["input_ids"])
  full = [enc(t.format(record.prompt + " " + record.target)) for t in templates] + [enc(loc)]
  prompts = [enc(t.format(record.prompt)) for t in templates]
  return full, prompts


def _hyper(settings: WiseEditorSettings) -> core.Hyper:
  a, b, g = settings.act_margin
  return core.Hyper(*(jnp.float32(v) for v in (settings.edit_lr, settings.norm_constraint, a, b, g)))


def edit_rows(model: Model, state: core.WiseState, full_rows, prompt_rows, pad_id: int,
              settings: WiseEditorSettings, mask_fn=None):
  """One WISE edit from token rows: a new mask at a shard's start, the jitted edit, the
  save / merge bookkeeping.

  Args:
    mask_fn: optional shard index -> explicit mask [d_in, d_out] (default: drawn from `state.rng`).

  Returns:
    (new state, EditInfo of device scalars).
  """
  from horse_jax.models import names  # noqa: PLC0415
  kernel = names.get_kernel(model.params, settings.layer)
  if state.n_edits % settings.save_freq == 0 and state.n_edits > 0:
    shard = state.n_edits // settings.save_freq
    if mask_fn is not None:
      mask, rng = mask_fn(shard), state.rng
    else:
      mask, rng = core.draw_mask(state.rng, settings.mask_ratio, *kernel.shape)
    state = state._replace(mask=jnp.asarray(mask, jnp.float32), rng=rng)
  ids, mask, labels, start = layout(full_rows, prompt_rows, pad_id)
  side, min_act, info = core.edit_program(
      model, state.side, state.side_min_act, state.mask, jnp.asarray(ids), jnp.asarray(mask),
      jnp.asarray(labels), jnp.int32(start), _hyper(settings), layer=settings.layer,
      n_iter=settings.n_iter, act_name=model.config.hidden_act)
  state = state._replace(side=side, side_min_act=min_act, n_edits=state.n_edits + 1)
  return core.after_edit(state, kernel, settings), info


def apply_edits(model: Model, state: core.WiseState, tokenizer, records, templates, settings,
                *, progress: bool = False):
  """Edits `records` one after another; per-edit info is fetched once at the end."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  from horse_jax.data.tokenize import padding_id  # noqa: PLC0415
  pad = padding_id(tokenizer)
  pending = []
  for record in tqdm(records, desc="wise edits", disable=not progress, unit="edit"):
    full, prompts = record_rows(tokenizer, record, templates)
    state, info = edit_rows(model, state, full, prompts, pad, settings)
    pending.append(info)
  return state, [{k: float(np.asarray(v)) for k, v in i._asdict().items()}
                 for i in jax.device_get(pending)]


def _adapter(model, state, act_ratio, layer):
  from horse_jax.models import names  # noqa: PLC0415
  kernel = names.get_kernel(model.params, layer)

  def adapter_for(mask, last):
    del last
    return lambda x_in, y_out: core.routed_output(x_in, y_out, mask, kernel, state, act_ratio,
                                                  model.config.hidden_act)
  return adapter_for


def _arrays(state: core.WiseState) -> core.WiseState:
  """The state's arrays only (host counters dropped), for jitted inference."""
  return state._replace(n_edits=0, merges=0, rng=())


@functools.partial(jax.jit, static_argnames=("layer",))
def _logits_jit(model, state, input_ids, attention_mask, labels, act_ratio, *, layer):
  return scored_logits(model, layer, (input_ids, attention_mask, labels),
                       _adapter(model, state, act_ratio, layer))


@functools.partial(jax.jit, static_argnames=("layer", "max_new_tokens"))
def _generate_jit(model, state, input_ids, attention_mask, act_ratio, *, layer, max_new_tokens):
  return greedy_whole(model, layer, input_ids, attention_mask, max_new_tokens,
                      _adapter(model, state, act_ratio, layer))


def logits_fn(model: Model, state: core.WiseState, settings: WiseEditorSettings):
  """EditBatch -> logits [B, T, V] of the edited model (routed once per full sequence)."""
  arrays, ratio = _arrays(state), jnp.float32(settings.act_ratio)
  return lambda batch: _logits_jit(model, arrays, jnp.asarray(batch.input_ids),
                                   jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels),
                                   ratio, layer=settings.layer)


def generate_fn(model: Model, state: core.WiseState, settings: WiseEditorSettings):
  """(left-padded ids, mask, max_new_tokens) -> greedy tokens [B, N], re-routed at every step."""
  arrays, ratio = _arrays(state), jnp.float32(settings.act_ratio)
  return lambda ids, mask, n: _generate_jit(model, arrays, jnp.asarray(ids), jnp.asarray(mask),
                                            ratio, layer=settings.layer, max_new_tokens=int(n))


class WiseModel(NamedTuple):
  """The edited model: the base model (never changed) plus WISE's state."""

  model: Model
  state: core.WiseState
  settings: WiseEditorSettings

  def logits(self, batch) -> jax.Array:
    """EditBatch -> logits [B, T, V] (see `logits_fn`)."""
    return logits_fn(self.model, self.state, self.settings)(batch)

  def generate(self, input_ids_BxT, attention_mask_BxT, max_new_tokens: int) -> jax.Array:
    """Greedy tokens [B, N] of left-padded prompts (see `generate_fn`)."""
    return generate_fn(self.model, self.state, self.settings)(input_ids_BxT, attention_mask_BxT,
                                                             max_new_tokens)
