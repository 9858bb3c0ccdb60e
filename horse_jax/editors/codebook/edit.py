"""HoReN / GRACE edits as jitted programs over blocks of edits, and the sequential loop around them.

One program (`edit_block`, compiled once per (capacity, block size, sequence length, label width,
settings, mesh)) applies B edits in their order:
  1. h0 = residual stream entering the wrapped layer L (layers below never change: computed once);
     the wrapped layer runs once to get its module input x and output y; q = query(x, p), p =
     prompt_len - 1.
  2. Decide, edit after edit (`lax.scan`, cheap: retrievals only): HoReN reuses j* when s[j*] >
     threshold and label_j* == the edit's label, else appends the *unrefined* query as a new key
     (value cold: uniform [0, 1) seeded by the edit counter; warm: the module's own output y[p]) with
     this label; GRACE uses its radius rules (grace.py). Then the retrieval is redone with the updated
     codebook -> (j, match): the row this edit trains and whether its own prompt retrieves it.
  3. Train: each edit trains row j (value, or LoRA A_j, B_j) with a fresh Adam(edit_lr) for n_iter
     steps (`lax.scan`) on the token-mean CE of "prompt target" (prompt masked); the B edits train
     together, batched (Adam is elementwise and the edits' losses are independent, so the batch is
     B separate optimizations).
  4. Write the trained rows back and score each edit right away (teacher-forced token accuracy).

Why the block equals one-at-a-time editing (B = 1, the reference semantics). An edit's decision and
its (j, match) depend only on keys, labels, radii and the count, which training never changes, and
on its query, which the unchanged layers below L fix; so step 2 run over the block in order makes
exactly the sequential decisions. Edit i's training forward reads only row j_i (value or A, B) and
the flag match_i, because only position p is changed and its retrieval result is the fixed (j_i,
match_i) (the query is fixed; the reference, too, retrieves once per forward from the unchanged
input). So edit i trains exactly as sequentially iff row j_i holds, when its training starts, what it
held after the last earlier edit that trained j_i. Exact condition for training edits together: no
two of them train the same row. Edits of a block that share a row are trained in waves: wave w trains
the edits that have w earlier edits of the block with the same row (the ones without a shared row
are all in wave 0), so each starts from its predecessor's trained row. With no shared row a block
costs one batched training; every shared row adds a wave (a masked batched training) for that block.
Float results equal the sequential ones up to the batch-size dependence of the matmul kernels.

Speed: when the wrapped module's output is the last thing layer L adds to the residual stream
(its architecture's `residual_writers`: down_proj of the llama family, GPT-2 mlp.c_proj, GPT-J
fc_out / out_proj), the edited residual after
layer L is the unedited one plus (new y[p] - y[p]) at p (and at t > p with `edit_span=onward`), so
training runs only layers L+1.. and the head; otherwise layer L is rerun with the adapter hook. An
attention output projection followed by the same layer's MLP (llama o_proj, GPT-2 attn.c_proj,
gpt-oss o_proj) takes the second path: that MLP sees the change, so adding it after the layer
would train against a different model than the one inference runs. Either way an Adam step runs
only the window of positions [p, p + W) that holds the labels: positions before p are not changed
by the edit (causal attention), so their keys/values come from one unedited pass (a KV cache, as
in decoding), and positions after the window reach no label.
The codebook buffers are donated, so an edit updates them in place instead of copying capacity rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from horse_jax import inflight
from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors.codebook import block_retrieval, grace
from horse_jax.editors.codebook.adapter import new_output, put_edit
from horse_jax.editors.codebook.query import make_query
from horse_jax.editors.codebook.retrieval import retrieve_live, settings_kwargs
from horse_jax.editors.codebook.settings import CodebookSettings, RetrievalHyper, hyper_of, jit_key
from horse_jax.editors.codebook.shards import Rows, on_rows
from horse_jax.editors.codebook.state import (Codebook, ensure_room, grow, label_key, place,
                                              planned_capacity, shardings)
from horse_jax.models import Hooks, Model, hidden_before, layer_index
from horse_jax.models.generate import init_cache
from horse_jax.models.hooks import Tap
from horse_jax.models.layers import attention_bias
from horse_jax.models.transformer import arch, default_positions, run_layers

DEFAULT_BLOCK = CodebookSettings.edit_block  # edits per program (1 = the one-at-a-time reference loop)

class EditInfo(NamedTuple):
  """What edits did (device arrays: scalars for one edit, [B] for a block).

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
  return jnp.sum(row_ce(logits_BxTxV, labels_BxT) * row_tokens(labels_BxT)) / jnp.maximum(
      jnp.sum(row_tokens(labels_BxT)), 1)


def token_acc(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Mean over label positions of argmax(logits) == label."""
  valid = labels_BxT != IGNORE
  hit = (jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def row_tokens(labels_BxT: jax.Array) -> jax.Array:
  """Label positions per row [B] (float32)."""
  return jnp.sum(labels_BxT != IGNORE, axis=-1).astype(jnp.float32)


def row_ce(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Per-row token-mean cross-entropy [B] over label positions (0 for a row without labels)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  valid = labels_BxT != IGNORE
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels_BxT, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0), axis=-1) / jnp.maximum(row_tokens(labels_BxT), 1.0)


def row_acc(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
  """Per-row token accuracy [B] over label positions."""
  valid = labels_BxT != IGNORE
  hit = (jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT) & valid
  return jnp.sum(hit, axis=-1) / jnp.maximum(row_tokens(labels_BxT), 1.0)


def label_slots(labels_BxW: jax.Array, n_tokens: int) -> tuple[jax.Array, jax.Array]:
  """The label positions of a [B, W] label window, gathered into a static K = n_tokens.

  Args:
    labels_BxW: labels (IGNORE where none); at most n_tokens are not IGNORE.
    n_tokens: K.

  Returns:
    (flat indices [K] into B W, row-major; labels [K], IGNORE on the slots past the last label).
  """
  flat = labels_BxW.reshape(-1)
  idx_K = jnp.nonzero(flat != IGNORE, size=n_tokens, fill_value=0)[0]
  used_K = jnp.arange(n_tokens) < jnp.sum(flat != IGNORE)
  return idx_K, jnp.where(used_K, flat[idx_K], IGNORE)


def per_row(token_K: jax.Array, row_K: jax.Array, labels_BxW: jax.Array) -> jax.Array:
  """Per-row mean [B] of per-token values [K] (0 on unused slots) over each row's label positions."""
  b = labels_BxW.shape[0]
  total = jax.ops.segment_sum(token_K, row_K, num_segments=b)
  return total / jnp.maximum(row_tokens(labels_BxW), 1.0)


def writes_residual(model: Model, name: str) -> bool:
  """Whether module `name`'s output is its layer's last addition to the residual stream (fast path).

  The architecture declares these modules (`Architecture.residual_writers`).
  """
  return any(name.endswith("." + s) for s in arch(model.config).residual_writers)


def _decide_one(book: Codebook, q: jax.Array, label: jax.Array, ok: jax.Array, y_p: jax.Array,
                settings: CodebookSettings, lookup: Callable | None = None,
                hyper: RetrievalHyper | None = None, rows: Rows = Rows()):
  """One edit's add/reuse decision and codebook update (nothing changes when `ok` is False).

  Args:
    lookup: optional HoReN retrieval fn(book, q, own) -> Retrieval, `own` = whether the edit's own
      key has been appended (`block_retrieval`); default: `retrieve_live` over the book's live rows.
    hyper: the traced floats; default `hyper_of(settings)`.
    rows: where the book's rows sit (one device's inside `shards.on_rows`).

  Returns:
    (codebook, (added, j, first_score, match)).
  """
  hyper = hyper_of(settings) if hyper is None else hyper
  if lookup is None:
    lookup = lambda bk, q_, own: retrieve_live(q_, bk.keys, bk.count, rows=rows,
                                               **settings_kwargs(settings, hyper))
  slot = book.count
  radius = book.radius
  if settings.method == "grace":
    dec = grace.decide(q, label, book.keys, book.radius, book.labels, book.count, hyper.grace_eps,
                       rows)
    reuse, first_score = dec.reuse, dec.distance
    radius = rows.put(radius, dec.index, dec.new_radius_nearest, ok)
    radius = rows.put(radius, slot, dec.new_key_radius, ~reuse & ok)
  else:
    first = lookup(book, q, jnp.asarray(False))
    same_label = jnp.all(rows.take(book.labels, first.index) == label) & (first.index != 0)
    reuse, first_score = first.match & same_label, first.score
  add = ~reuse & ok
  rng_value, rng_lora = jax.random.split(
      jax.random.fold_in(jax.random.PRNGKey(settings.seed), book.n_edits))
  d_out = book.values.shape[1]
  value0 = y_p.astype(jnp.float32) if settings.val_init == "warm" else jax.random.uniform(
      rng_value, (d_out,))
  if settings.adapter_mode == "lora":
    value0 = jnp.zeros((d_out,))  # LoRA mode learns A, B; the value row stays unused
  lora_a0 = 0.01 * jax.random.normal(rng_lora, book.lora_a.shape[1:])
  book = Codebook(
      keys=rows.put(book.keys, slot, q, add),
      values=rows.put(book.values, slot, value0, add),
      labels=rows.put(book.labels, slot, label, add),
      radius=radius,
      lora_a=rows.put(book.lora_a, slot, lora_a0, add),
      lora_b=rows.put(book.lora_b, slot, jnp.zeros(book.lora_b.shape[1:]), add),
      count=book.count + add.astype(jnp.int32),
      n_edits=book.n_edits + ok.astype(jnp.int32),
  )
  # Retrieval with the updated codebook picks the row that the edit's forward pass will use.
  if settings.method == "grace":
    found = grace.lookup(q, book.keys, book.radius, book.count, rows)
  else:
    found = lookup(book, q, add)
  return book, (add, found.index, first_score, found.match)


def _decide_block(book: Codebook, q_B, label_Bx2, valid_B, y_p_B, settings: CodebookSettings,
                  hyper: RetrievalHyper | None = None, rows: Rows = Rows()):
  """The block's decisions in order (`_decide_one` per edit). HoReN with one Hopfield step and
  more than one edit retrieves against the pre-block rows through matmuls (`block_retrieval`):
  the same decisions as the one-at-a-time path, which a block of one keeps. `rows`: where the
  book's rows sit (one device's inside `shards.on_rows`; the per-edit inputs are whole).

  Returns:
    (codebook, (added [B], j [B], first_score [B], match [B])).
  """
  b = q_B.shape[0]
  hyper = hyper_of(settings) if hyper is None else hyper
  if settings.method == "grace" or settings.hopfield_retrieval_max_iter != 1 or b == 1:
    return jax.lax.scan(lambda bk, inp: _decide_one(bk, *inp, settings=settings, hyper=hyper,
                                                    rows=rows), book,
                        (q_B, label_Bx2, valid_B, y_p_B))
  kwargs = settings_kwargs(settings, hyper)
  del kwargs["max_iter"]
  pre = block_retrieval.prepare(book.keys, book.count, q_B, beta=hyper.hopfield_retrieval_beta,
                                rows=rows)
  own_B = jnp.arange(b)

  def body(carry, inp):
    bk, visible_B, slot_B = carry
    i, q, label, ok, y_p = inp
    slot_B = slot_B.at[i].set(bk.count)  # where this edit's key goes if it is appended

    def lookup(_, q_, own):
      return block_retrieval.retrieve_in_block(pre, i, q_, visible_B | ((own_B == i) & own), slot_B,
                                               rows=rows, **kwargs)

    bk, out = _decide_one(bk, q, label, ok, y_p, settings, lookup, hyper, rows)
    return (bk, visible_B | ((own_B == i) & out[0]), slot_B), out

  (book, _, _), out = jax.lax.scan(body, (book, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32)),
                                   (own_B, q_B, label_Bx2, valid_B, y_p_B))
  return book, out


def _waves(j_B: jax.Array, valid_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(wave [B]: earlier valid edits of the block with the same row, number of waves [])."""
  b = j_B.shape[0]
  earlier = jnp.arange(b)[None, :] < jnp.arange(b)[:, None]
  same = (j_B[:, None] == j_B[None, :]) & valid_B[None, :] & earlier
  wave = jnp.sum(same, axis=1).astype(jnp.int32)
  return wave, jnp.where(jnp.any(valid_B), jnp.max(jnp.where(valid_B, wave, 0)) + 1, 0)


def edit_block(model: Model, book: Codebook, input_ids_BxT, attention_mask_BxT, labels_BxT,
               prompt_len_B, label_Bx2, valid_B, *, settings: CodebookSettings, n_label: int,
               n_tokens: int | None = None, mesh=None,
               unroll: int = 1) -> tuple[Codebook, EditInfo]:
  """Applies B edits in order (see module docstring); invalid rows (block padding) do nothing.

  Args:
    model: the base model (never changed).
    book: the codebook with room for B more rows (`state.ensure_room`). Donated.
    input_ids_BxT, attention_mask_BxT, labels_BxT: right-padded tokenized edits.
    prompt_len_B: prompt tokens (BOS included); p = prompt_len - 1.
    label_Bx2: label keys (`state.label_key`), int32.
    valid_B: which rows are edits (False rows pad the last block).
    settings: editor settings.
    n_label: window width W: every row's labels lie in [p, p + W) (`_n_label`).
    n_tokens: None, or K >= the block's label positions (`_n_tokens`): the final norm, the head
      and the loss run on the K label positions gathered from the [B, W] window instead of on all
      B W positions (the head is most of an Adam step's FLOPs on a small model with a large
      vocabulary, and a window padded to the longest target holds mostly non-label positions).
      Same losses up to the order of the float sums.
    mesh: optional (`data`, `model`) mesh: the codebook keeps `state.shardings` and the block's
      edits are split over `data` for training.
    unroll: Adam steps unrolled per loop iteration (XLA's cost analysis counts a loop body once:
      the benchmark compiles n_iter = unroll = 2 and 1 to get the FLOPs of one step).

  Returns:
    (new codebook, EditInfo of [B] arrays).
  """
  return _edit_block_jit(model, book, input_ids_BxT, attention_mask_BxT, labels_BxT, prompt_len_B,
                         label_Bx2, valid_B, hyper_of(settings), settings=jit_key(settings),
                         n_label=int(n_label), n_tokens=None if n_tokens is None else int(n_tokens),
                         mesh=mesh, unroll=int(unroll))


@functools.partial(jax.jit, static_argnames=("settings", "n_label", "n_tokens", "mesh", "unroll"),
                   donate_argnames=("book",))
def _edit_block_jit(model, book, input_ids_BxT, attention_mask_BxT, labels_BxT, prompt_len_B,
                    label_Bx2, valid_B, hyper, *, settings, n_label, mesh, unroll=1, n_tokens=None):
  cfg, name = model.config, settings.layer
  layer = layer_index(name)
  b, t = input_ids_BxT.shape
  mask = jnp.asarray(attention_mask_BxT)
  positions = default_positions(mask)
  p_B = jnp.asarray(prompt_len_B, jnp.int32) - 1
  rows_B = jnp.arange(b)
  valid_B = jnp.asarray(valid_B, bool)

  def batch_split(x):
    """Training of a block is data parallel: edits split over `data` when the mesh allows."""
    if mesh is None or "data" not in mesh.shape or b % mesh.shape["data"]:
      return x
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))

  seen = {}

  def grab(x_in, y_out):
    seen["x"], seen["y"] = x_in, y_out
    return y_out

  with jax.named_scope("layers_below"):  # the named scopes let a profile attribute every XLA op
    h0 = batch_split(hidden_before(model, layer, input_ids_BxT, mask))
    h_next = run_layers(model, h0, mask, positions, Tap(Hooks(adapters={name: grab})), layer,
                        layer + 1)
  x_BxTxD, y_BxTxD = seen["x"], seen["y"]
  q_B = jax.vmap(lambda x, p: make_query(x, p, 0, settings.query_selection_strategy,
                                                 settings.normalize_codebook_keys))(x_BxTxD,
                                                                                          p_B)
  y_p = y_BxTxD[rows_B, p_B]

  # The decisions run where the codebook rows are (`shards.on_rows`); the block's queries, labels
  # and outputs at p are small and seen whole by every device.
  with jax.named_scope("decide"):
    book, (added, j_B, first_score, match_B) = on_rows(
        lambda rows, bk, q, lab, ok, y, hy: _decide_block(bk, q, lab, ok, y, settings, hy, rows),
        mesh, book, q_B,
        jnp.asarray(label_Bx2, jnp.int32), valid_B, y_p, hyper, returns=("book", "replicated"))
  wave_B, n_waves = _waves(j_B, valid_B)

  # Training runs only the window of W = n_label positions [p, p + W) (every label lies in it) through
  # the layers from `first` up: positions before p are unchanged by the edit, so their keys/values
  # come from one unedited pass (a KV cache, as in decoding), and positions after the window never
  # reach a label position (causal attention).
  mod = arch(cfg)
  residual = writes_residual(model, name)
  first = layer + 1 if residual else layer
  above = range(first, cfg.num_layers)
  w = int(n_label)
  slots = t + w  # room for a window that runs past the padded length
  h_start = h_next if residual else h0
  kv_valid = jnp.concatenate([mask != 0, jnp.zeros((b, w), bool)], axis=1)
  caches = init_cache(model, b, slots)
  bias_all = attention_bias(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(slots), kv_valid,
                            cfg.sliding_window)
  prefix = []
  h = h_start
  with jax.named_scope("prefix_cache"):
    for i in above:
      h, kv = mod.block(mod.layer_params(model.params, i), cfg, h, positions, bias_all, Tap(None),
                        i, cache=(*caches[i], 0))
      prefix.append(kv)
  win_BxW = p_B[:, None] + jnp.arange(w)[None, :]
  pad = lambda x, fill: jnp.concatenate([x, jnp.full((b, w) + x.shape[2:], fill, x.dtype)], axis=1)
  take = lambda x: jnp.take_along_axis(x, win_BxW.reshape(win_BxW.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  h_win = take(pad(h_start, 0))
  last_pos = positions[:, -1:] + 1 + jnp.arange(w)[None, :]
  pos_win = take(jnp.concatenate([positions, last_pos.astype(positions.dtype)], axis=1))
  lab_BxW = take(pad(jnp.asarray(labels_BxT, jnp.int32), IGNORE))
  bias_win = attention_bias(win_BxW, jnp.arange(slots), kv_valid, cfg.sliding_window)
  changed_W = jnp.arange(w) == 0 if settings.edit_span != "onward" else jnp.ones((w,), bool)

  def run_window(h_WxD, pos_W, bias_1xWxS, start, kv, m, v, aa, b_):
    """One edit's window through the layers from `first` (vmapped over the block's edits)."""
    h = h_WxD[None]
    for n, i in enumerate(above):
      tap = Tap(None)
      if i == layer:  # the wrapped module is not a residual writer: apply the entry at p (slot 0)
        def adapter(x_in, y_out):
          del x_in  # the query is fixed: layers below the wrapped one do not change
          row = new_output(settings, y_out[0, 0], m, v, aa, b_, hyper)
          return put_edit(settings, y_out, jnp.zeros((1,), jnp.int32), row[None])
        tap = Tap(Hooks(adapters={name: adapter}))
      k, vv = kv[n]
      h, _ = mod.block(mod.layer_params(model.params, i), cfg, h, pos_W[None], bias_1xWxS[None],
                       tap, i, cache=(k[None], vv[None], start))
    return h[0]

  def hidden_of(params, row0):
    """Last layer's output [B, W, D] over the window with each edit's trained entry applied."""
    value = params.get("value", row0["value"])
    a, bb = params.get("a", row0["a"]), params.get("b", row0["b"])
    h = h_win
    if residual:
      new_p = jax.vmap(lambda y, m, v, aa, b_: new_output(settings, y, m, v, aa, b_, hyper))(
          y_p, match_B, value, a, bb)
      delta = new_p.astype(jnp.float32) - y_p.astype(jnp.float32)
      h = h + jnp.where(changed_W[None, :, None], delta[:, None, :], 0.0).astype(h.dtype)
    with jax.named_scope("window_layers"):
      return jax.vmap(run_window)(h, pos_win, bias_win, p_B, prefix, match_B, value, a, bb)

  if n_tokens is None:
    def scores(h_BxWxD):
      """(per-edit CE [B], per-edit token accuracy [B]) of the window's logits."""
      with jax.named_scope("head_loss"):
        logits = mod.head(model.params, cfg, h_BxWxD, Tap(None))
        return row_ce(logits, lab_BxW), row_acc(logits, lab_BxW)
  else:
    idx_K, lab_K = label_slots(lab_BxW, n_tokens)

    def scores(h_BxWxD):
      """The same from the head run on the K gathered label positions only."""
      with jax.named_scope("head_loss"):
        h_K = h_BxWxD.reshape((b * w,) + h_BxWxD.shape[2:])[idx_K]
        logits_Kx1xV = mod.head(model.params, cfg, h_K[:, None], Tap(None))
        return (per_row(row_ce(logits_Kx1xV, lab_K[:, None]), idx_K // w, lab_BxW),
                per_row(row_acc(logits_Kx1xV, lab_K[:, None]), idx_K // w, lab_BxW))

  # The learning rate is a traced hyperparameter: a sweep over edit_lr reuses this program.
  opt = optax.inject_hyperparams(optax.adam)(learning_rate=hyper.edit_lr)

  def train_wave(w, carry):
    book, info = carry
    active = valid_B & (wave_B == w)
    # Each trained row is read from, and written back to, the device that holds it.
    row0 = on_rows(lambda rows, bk, j: {"value": jax.vmap(lambda i: rows.take(bk.values, i))(j),
                                        "a": jax.vmap(lambda i: rows.take(bk.lora_a, i))(j),
                                        "b": jax.vmap(lambda i: rows.take(bk.lora_b, i))(j)},
                   mesh, book, j_B, returns=("replicated",))
    params = {"a": row0["a"], "b": row0["b"]} if settings.adapter_mode == "lora" else {
        "value": row0["value"]}
    params = batch_split(params)

    def loss_fn(params):
      ce_B, _ = scores(hidden_of(params, row0))
      return jnp.sum(ce_B), ce_B  # edits are independent: d(sum)/d(entry_i) = d(ce_i)/d(entry_i)

    def step(carry, _):
      params, opt_state = carry
      (_, ce_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), ce_B

    with jax.named_scope("adam_steps"):
      (params, _), ce_NxB = jax.lax.scan(step, (params, opt.init(params)), None,
                                         length=settings.n_iter, unroll=unroll)
    with jax.named_scope("final_score"):
      ce_last, acc_last = scores(hidden_of(params, row0))

    def write(rows, bk, trained, j, when):
      if "value" in trained:
        return _replace(bk, values=rows.put_many(bk.values, j, trained["value"], when))
      return _replace(bk, lora_a=rows.put_many(bk.lora_a, j, trained["a"], when),
                      lora_b=rows.put_many(bk.lora_b, j, trained["b"], when))

    book = on_rows(write, mesh, book, params, j_B, active)
    new = (ce_NxB[0], ce_last, acc_last)
    info = tuple(jnp.where(active, n, o) for n, o in zip(new, info))
    return book, info

  zeros = jnp.zeros((b,), jnp.float32)
  book, (loss_first, loss_last, acc) = jax.lax.fori_loop(0, n_waves, train_wave,
                                                         (book, (zeros, zeros, zeros)))
  info = EditInfo(added, j_B, first_score, match_B, loss_first, loss_last, acc)
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    book = jax.lax.with_sharding_constraint(book, shardings(book, mesh))
    # Per-edit info replicated: every process can fetch it (multi-host), and it is B numbers.
    info = jax.lax.with_sharding_constraint(info, NamedSharding(mesh, P()))
  return book, info


def _replace(book: Codebook, **fields) -> Codebook:
  return dataclasses.replace(book, **fields)


def edit_step(model: Model, book: Codebook, input_ids_T: jax.Array, attention_mask_T: jax.Array,
              labels_T: jax.Array, prompt_len: jax.Array, label: jax.Array, *,
              settings: CodebookSettings, mesh=None) -> tuple[Codebook, EditInfo]:
  """Applies one edit to the codebook (a block of one: the reference semantics).

  Args:
    model: the base model (never changed).
    book: the codebook; must have room for one more row (`state.ensure_room`). Donated.
    input_ids_T, attention_mask_T, labels_T: one right-padded tokenized edit [T].
    prompt_len: prompt tokens (BOS included); p = prompt_len - 1.
    label: the edit's label key, int32 [2] (`state.label_key`).
    settings: editor settings.
    mesh: optional mesh (see `edit_block`).

  Returns:
    (new codebook, EditInfo of scalars).
  """
  labels_T = jnp.asarray(labels_T)
  book, info = edit_block(model, book, jnp.asarray(input_ids_T)[None],
                          jnp.asarray(attention_mask_T)[None], labels_T[None],
                          jnp.asarray(prompt_len, jnp.int32)[None], jnp.asarray(label)[None],
                          jnp.ones((1,), bool), settings=settings, n_label=labels_T.shape[0],
                          mesh=mesh)
  return book, EditInfo(*(x[0] for x in info))


def compile_count() -> int:
  """How many edit programs this process has compiled (one per shape/settings bucket)."""
  return _edit_block_jit._cache_size()


def _n_label(labels_NxT: np.ndarray, prompt_len_N: np.ndarray) -> int:
  """Window width of a batch: the most positions from p = prompt_len - 1 to a row's last label,
  rounded up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and their 1.5 multiples: calls with
  similar targets share one program, and a window is at most a third wider than its longest
  target). (Labels start at p, as `tokenize_edits` writes them; a label before p would not be
  trained.)"""
  labels = np.asarray(labels_NxT)
  t = labels.shape[1]
  last = np.where(labels != IGNORE, np.arange(t)[None, :], -1).max(axis=1, initial=-1)
  most = int(max(1, (last - (np.asarray(prompt_len_N) - 1) + 1).max(initial=1)))
  power = 1 << (most - 1).bit_length()
  return power * 3 // 4 if power >= 4 and power * 3 // 4 >= most else power


def _n_tokens(labels_NxT: np.ndarray, block: int, width: int) -> int | None:
  """Label positions gathered per block program (`edit_block`'s n_tokens), or None to run the head
  on the whole [block, width] window: the most label positions of any block of `block` rows,
  rounded up to a multiple of block * width / 8 (at most 8 programs per window shape). None for a
  block of one (one edit's padding is at most a third of its window) or when nothing is saved."""
  if block == 1:
    return None
  counts = np.sum(np.asarray(labels_NxT) != IGNORE, axis=1)
  counts = np.concatenate([counts, np.zeros((-len(counts)) % block, counts.dtype)])
  most = int(counts.reshape(-1, block).sum(axis=1).max(initial=1))
  grain = max(1, block * width // 8)
  k = -(-max(most, 1) // grain) * grain
  return None if k >= block * width else k


def window_shape(labels_NxT: np.ndarray, prompt_len_N: np.ndarray, block: int,
                 mesh=None) -> tuple[int, int | None]:
  """(n_label, n_tokens) of `edit_block` for these edits run `block` at a time (`_n_label`,
  `_n_tokens`). Gathering the label positions mixes a block's rows, so it stays off when the
  block's training is split over a `data` axis of the mesh."""
  if not len(labels_NxT):
    return 1, None
  width = _n_label(labels_NxT, prompt_len_N)
  split = mesh is not None and mesh.shape.get("data", 1) > 1
  return width, None if split else _n_tokens(labels_NxT, block, width)


def apply_edit(model: Model, book: Codebook, batch: EditBatch, row: int,
               settings: CodebookSettings, *, mesh=None) -> tuple[Codebook, EditInfo]:
  """Applies row `row` of a tokenized batch as one edit (grows the codebook first if full).

  One host sync (reading the count); `apply_edits` runs many edits without any.

  Args:
    model: the base model.
    book: the codebook (consumed: its buffers are donated).
    batch: right-padded tokenized edits (`tokenize_edits`).
    row: which edit of the batch.
    settings: editor settings.
    mesh: optional (`data`, `model`) mesh for the codebook's shardings.

  Returns:
    (new codebook, EditInfo of scalars).
  """
  cap = book.capacity
  book = ensure_room(book)
  if mesh is not None and (book.capacity != cap or not _on_mesh(book, mesh)):
    book = place(book, mesh)
  length = int(batch.attention_mask[row].sum())
  label = label_key(batch.labels[row], length, settings.label_match)
  labels = np.asarray(batch.labels[row:row + 1])
  book, info = edit_block(model, book, jnp.asarray(batch.input_ids[row:row + 1]),
                          jnp.asarray(batch.attention_mask[row:row + 1]), jnp.asarray(labels),
                          jnp.asarray(batch.prompt_len[row:row + 1], jnp.int32),
                          jnp.asarray(label[None]), jnp.ones((1,), bool), settings=settings,
                          n_label=_n_label(labels, batch.prompt_len[row:row + 1]), mesh=mesh)
  return book, EditInfo(*(x[0] for x in info))


def _on_mesh(book: Codebook, mesh) -> bool:
  sharding = getattr(book.values, "sharding", None)
  return getattr(sharding, "mesh", None) == mesh


def apply_edits(model: Model, book: Codebook, batch: EditBatch, settings: CodebookSettings, *,
                rows: Iterable[int] | None = None, progress: bool = True,
                callback: Callable | None = None, block: int | None = None, mesh=None,
                fetch_every: int = 64) -> tuple[Codebook, list[dict]]:
  """Applies edits one after another, `block` edits per compiled call, with no host sync per edit.

  The count is read once; the capacity is then grown once to hold every edit of the call (so a run
  compiles one program per (capacity, block) instead of one per doubling). Per-edit info stays on
  the device and is fetched every `fetch_every` blocks.

  Args:
    model: the base model (sharded by the caller, e.g. `models.shard_model`, when a mesh is used).
    book: the codebook to extend (consumed).
    batch: tokenized edits; all rows share one padded length.
    settings: editor settings.
    rows: which rows, in order (default all).
    progress: show a tqdm bar.
    callback: optional fn(done, book) after each block (`done` = edits applied so far in this call).
    block: edits per program (default `settings.edit_block`); 1 = the one-at-a-time reference path
      (any block size gives the same codebook, see the module docstring). A call with fewer edits
      uses the smallest power of two holding them.
    mesh: optional (`data`, `model`) mesh: the codebook gets `state.shardings`.
    fetch_every: blocks between two transfers of per-edit info to the host.

  Returns:
    (new codebook, per-edit info dicts with Python scalars).
  """
  rows = np.asarray(list(range(batch.input_ids.shape[0]) if rows is None else rows), np.int64)
  n = len(rows)
  # Short calls use a smaller power-of-two block (at most log2(block) + 1 programs), not a padded one.
  block = settings.edit_block if block is None else int(block)
  block = max(1, min(block, planned_capacity(max(n, 1), 1)))
  book = grow(book, planned_capacity(int(book.count) + n, book.capacity))
  book = place(book, mesh)
  ids = np.asarray(batch.input_ids)[rows]
  mask = np.asarray(batch.attention_mask)[rows]
  labels = np.asarray(batch.labels)[rows]
  plen = np.asarray(batch.prompt_len, np.int32)[rows]
  keys = np.stack([label_key(labels[i], int(mask[i].sum()), settings.label_match)
                   for i in range(n)]) if n else np.zeros((0, 2), np.int32)
  n_label, n_tokens = window_shape(labels, plen, block, mesh)
  pad = (-n) % block

  def padded(x):
    return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x

  ids, mask, plen, keys = padded(ids), padded(mask), padded(plen), padded(keys)
  labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE, labels.dtype)]) \
      if pad else labels
  valid = np.arange(n + pad) < n
  pending, host = [], []
  bar = tqdm(total=n, desc=f"{settings.method} edits", disable=not progress, unit="edit")
  for s in range(0, n + pad, block):
    e = s + block
    book, info = edit_block(model, book, ids[s:e], mask[s:e], labels[s:e], plen[s:e], keys[s:e],
                            valid[s:e], settings=settings, n_label=n_label, n_tokens=n_tokens,
                            mesh=mesh)
    pending.append(info)
    inflight.settle(pending)  # unbounded dispatch deadlocks XLA's CPU client on a mesh (see inflight)
    if len(pending) >= 2 * fetch_every:
      # The oldest blocks are long done: fetching them does not stall the blocks still queued.
      host.extend(jax.device_get(pending[:fetch_every]))
      pending = pending[fetch_every:]
    bar.update(min(e, n) - min(s, n))
    if callback is not None:
      callback(min(e, n), book)
  bar.close()
  host.extend(jax.device_get(pending))
  out = []
  for info in host:
    cols = {k: np.asarray(v) for k, v in info._asdict().items()}
    for i in range(len(cols["added"])):
      out.append({k: v[i].item() for k, v in cols.items()})
  return book, out[:n]
