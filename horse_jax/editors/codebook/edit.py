"""One HoReN / GRACE edit as a single jitted program, and the sequential loop around it.

`edit_step` (compiled once per (capacity, sequence length, settings)):
  1. h0 = residual stream entering the wrapped layer (layers below never change: computed once);
     x = the wrapped module's input; q = query(x, p = prompt_len - 1).
  2. Decide: HoReN reuses j* when s[j*] > threshold and label_j* == this edit's label, else appends
     the *unrefined* query as a new key (value cold: uniform [0, 1) seeded by the edit counter; warm:
     the module's own output y[p]) with this label; GRACE uses its radius rules (grace.py).
  3. Recompute the retrieval with the updated codebook -> (j, match); train value[j] (or LoRA A_j,
     B_j) with a fresh Adam(edit_lr) for n_iter steps (`lax.scan`) on the token-mean CE of
     "prompt target" (prompt masked), running only the layers from the wrapped one upward.
  4. Write the trained entry back and score the edit right away (teacher-forced token accuracy).
The codebook buffers are donated, so an edit updates them in place instead of copying capacity rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors.codebook import grace
from horse_jax.editors.codebook.adapter import new_output, put_edit
from horse_jax.editors.codebook.query import make_query
from horse_jax.editors.codebook.retrieval import retrieve, settings_kwargs
from horse_jax.editors.codebook.settings import CodebookSettings, join_dynamic, split_dynamic
from horse_jax.editors.codebook.state import Codebook, ensure_room, label_key
from horse_jax.models import Hooks, Model, forward_from, hidden_before, layer_index
from horse_jax.models.names import get_module


class EditInfo(NamedTuple):
  """What one edit did (device scalars).

  Attributes:
    added: a new key was appended (else an existing one was reused).
    index: the codebook row trained.
    first_score: HoReN: s[j*] before the edit; GRACE: distance to the nearest key.
    match: whether the edit's own query retrieves row `index` after the decision.
    loss_first: CE before training; loss_last: after the last Adam step.
    edit_acc: teacher-forced token accuracy of the edit right after it (its own ES).
  """

  added: jax.Array
  index: jax.Array
  first_score: jax.Array
  match: jax.Array
  loss_first: jax.Array
  loss_last: jax.Array
  edit_acc: jax.Array


def token_ce(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Token-mean cross-entropy over positions with label != -100 (float32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  valid = labels_BxT != IGNORE
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels_BxT, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def token_acc(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Mean over label positions of argmax(logits) == label."""
  valid = labels_BxT != IGNORE
  hit = (jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def _module_output(model: Model, name: str, x_d: jax.Array) -> jax.Array:
  """The wrapped module's own output for one input row (float32)."""
  module = get_module(model.params, name)
  y = x_d.astype(jnp.float32) @ module["kernel"].astype(jnp.float32)
  if "bias" in module:
    y = y + module["bias"].astype(jnp.float32)
  return y


def _put(buf: jax.Array, row: jax.Array, value: jax.Array, when: jax.Array) -> jax.Array:
  """buf with buf[row] = value where `when`, else unchanged (one dynamic row update)."""
  return buf.at[row].set(jnp.where(when, value.astype(buf.dtype), buf[row]))


def edit_step(model: Model, book: Codebook, input_ids_T: jax.Array, attention_mask_T: jax.Array,
              labels_T: jax.Array, prompt_len: jax.Array, label: jax.Array, *,
              settings: CodebookSettings) -> tuple[Codebook, EditInfo]:
  """Applies one edit to the codebook (see module docstring).

  Args:
    model: the base model (never changed).
    book: the codebook; must have room for one more row (`state.ensure_room`). Donated.
    input_ids_T, attention_mask_T, labels_T: one right-padded tokenized edit [T].
    prompt_len: prompt tokens (BOS included); p = prompt_len - 1.
    label: the edit's label key, int32 [2] (`state.label_key`).
    settings: static editor settings.

  Returns:
    (new codebook, EditInfo).
  """
  static, numbers = split_dynamic(settings)
  return _edit_step_jit(model, book, input_ids_T, attention_mask_T, labels_T, prompt_len, label,
                        numbers, settings=static)


@functools.partial(jax.jit, static_argnames=("settings",), donate_argnames=("book",))
def _edit_step_jit(model, book, input_ids_T, attention_mask_T, labels_T, prompt_len, label, numbers,
                   *, settings):
  settings = join_dynamic(settings, numbers)
  name = settings.layer
  first_layer = layer_index(name)
  ids, mask, labels = input_ids_T[None], attention_mask_T[None], labels_T[None]
  p = jnp.asarray(prompt_len, jnp.int32) - 1
  h0 = hidden_before(model, first_layer, ids, mask)
  x_TxD = forward_from(model, first_layer, h0, mask, hooks=Hooks(capture=(name,))).captured[name][0]
  q = make_query(x_TxD, p, 0, settings.strategy, settings.normalize)
  y_p = _module_output(model, name, x_TxD[p])

  # Decide: reuse an existing key or append a new one at row `slot`.
  slot = book.count
  radius = book.radius
  if settings.method == "grace":
    dec = grace.decide(q, label, book.keys, book.radius, book.labels, book.count, settings.grace_eps)
    reuse, first_score = dec.reuse, dec.distance
    radius = radius.at[dec.index].set(dec.new_radius_nearest)
    radius = _put(radius, slot, dec.new_key_radius, ~reuse)
  else:
    first = retrieve(q, book.keys, book.count, **settings_kwargs(settings))
    same_label = jnp.all(book.labels[first.index] == label) & (first.index != 0)
    reuse, first_score = first.match & same_label, first.score
  add = ~reuse
  rng_value, rng_lora = jax.random.split(
      jax.random.fold_in(jax.random.PRNGKey(settings.seed), book.n_edits))
  d_out = book.values.shape[1]
  value0 = y_p if settings.val_init == "warm" else jax.random.uniform(rng_value, (d_out,))
  if settings.adapter_mode == "lora":
    value0 = jnp.zeros((d_out,))  # LoRA mode learns A, B; the value row stays unused
  lora_a0 = 0.01 * jax.random.normal(rng_lora, book.lora_a.shape[1:])
  book = Codebook(
      keys=_put(book.keys, slot, q, add),
      values=_put(book.values, slot, value0, add),
      labels=_put(book.labels, slot, label, add),
      radius=radius,
      lora_a=_put(book.lora_a, slot, lora_a0, add),
      lora_b=_put(book.lora_b, slot, jnp.zeros(book.lora_b.shape[1:]), add),
      count=book.count + add.astype(jnp.int32),
      n_edits=book.n_edits + 1,
  )

  # Retrieval with the updated codebook picks the row that the forward pass will use.
  if settings.method == "grace":
    found = grace.lookup(q, book.keys, book.radius, book.count)
  else:
    found = retrieve(q, book.keys, book.count, **settings_kwargs(settings))
  j, match = found.index, found.match
  if settings.adapter_mode == "lora":
    params = {"a": book.lora_a[j], "b": book.lora_b[j]}
  else:
    params = {"value": book.values[j]}

  def loss_fn(params):
    value = params.get("value", book.values[j])
    a, b = params.get("a", book.lora_a[j]), params.get("b", book.lora_b[j])

    def adapter(x_in, y_out):
      del x_in  # the query is fixed: layers below the wrapped one do not change
      row = new_output(settings, y_out[0, p], match, value, a, b)
      return put_edit(settings, y_out, p[None], row[None])

    logits = forward_from(model, first_layer, h0, mask, hooks=Hooks(adapters={name: adapter})).logits
    return token_ce(logits, labels), logits

  opt = optax.adam(settings.edit_lr)

  def train_step(carry, _):
    params, opt_state = carry
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(train_step, (params, opt.init(params)), None,
                                     length=settings.n_iter)
  loss_last, logits = loss_fn(params)
  if "value" in params:
    book = dataclasses.replace(book, values=book.values.at[j].set(params["value"]))
  else:
    book = dataclasses.replace(book, lora_a=book.lora_a.at[j].set(params["a"]),
                             lora_b=book.lora_b.at[j].set(params["b"]))
  info = EditInfo(add, j, first_score, match, losses[0], loss_last, token_acc(logits, labels))
  return book, info


def compile_count() -> int:
  """How many programs `edit_step` has compiled in this process (one per shape/settings bucket)."""
  return _edit_step_jit._cache_size()


def apply_edit(model: Model, book: Codebook, batch: EditBatch, row: int,
               settings: CodebookSettings) -> tuple[Codebook, EditInfo]:
  """Applies row `row` of a tokenized batch as one edit (grows the codebook first if full).

  Args:
    model: the base model.
    book: the codebook (consumed: its buffers are donated).
    batch: right-padded tokenized edits (`tokenize_edits`).
    row: which edit of the batch.
    settings: editor settings.

  Returns:
    (new codebook, EditInfo).
  """
  book = ensure_room(book)
  length = int(batch.attention_mask[row].sum())
  label = label_key(batch.labels[row], length, settings.label_match)
  return edit_step(model, book, jnp.asarray(batch.input_ids[row]),
                   jnp.asarray(batch.attention_mask[row]), jnp.asarray(batch.labels[row]),
                   jnp.asarray(batch.prompt_len[row], jnp.int32), jnp.asarray(label),
                   settings=settings)


def apply_edits(model: Model, book: Codebook, batch: EditBatch, settings: CodebookSettings, *,
                rows: Iterable[int] | None = None, progress: bool = True,
                callback=None) -> tuple[Codebook, list[dict]]:
  """Applies edits one after another.

  Args:
    model: the base model.
    book: the codebook to extend (consumed).
    batch: tokenized edits; all rows share one padded length, so one program per capacity bucket.
    settings: editor settings.
    rows: which rows, in order (default all).
    progress: show a tqdm bar.
    callback: optional fn(i, book, info) after each edit (e.g. periodic re-scoring).

  Returns:
    (new codebook, per-edit info dicts with Python scalars).
  """
  rows = list(range(batch.input_ids.shape[0]) if rows is None else rows)
  infos = []
  for i in tqdm(rows, desc=f"{settings.method} edits", disable=not progress):
    book, info = apply_edit(model, book, batch, i, settings)
    infos.append(info)
    if callback is not None:
      callback(i, book, info)
  host = jax.device_get(infos)
  return book, [{k: (v.item() if hasattr(v, "item") else v) for k, v in x._asdict().items()}
                for x in host]
