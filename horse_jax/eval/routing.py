"""How separable are edits in the key space a codebook editor routes in?

HoReN and GRACE decide from one query vector per prompt, taken from the wrapped module's input (see
`horse_jax.editors.codebook.query`). Whether a rephrasing reaches its edit, and whether an unrelated
prompt stays out, is then a question about distances between queries, which this module measures
directly, without editing anything:

  edit keys      e_i = query(prompt_i)        (what an edit stores)
  rephrasings    r_i = query(rephrase_i)      (must route to e_i)
  unrelated      u_i = query(loc_prompt_i)    (must route nowhere)

HoReN (normalized queries, cosine score, strict threshold t): a rephrasing is *routed* when its best
key is its own edit's and the score is above t; an unrelated prompt *leaks* when its best score is
above t. GRACE (raw queries, Euclidean): the same with distance below a radius. Both depend on the
number of stored edits N, since every extra key is one more chance to be the nearest, so everything is
reported for prefixes of the stream of edits. The one Hopfield step HoReN adds before scoring moves a
query by at most alpha (0.1 by default) towards the keys' softmax mean; the raw scores bound what it
can change.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import bucket_length, padding_id
from horse_jax.editors.codebook.query import make_query
from horse_jax.models import Hooks, Model, forward


def prompt_queries(model: Model, tokenizer, prompts: Sequence[str], *, layer: str, strategy: str,
                   normalize: bool, batch_size: int = 64) -> np.ndarray:
  """The codebook query of each prompt, as HoReN/GRACE compute it at `layer`.

  Args:
    model: the unedited model.
    tokenizer: its tokenizer (BOS added as when editing).
    prompts: prompts (no target: the query only reads prompt positions).
    layer: the wrapped module (HF name).
    strategy: query selection strategy (e.g. `last_prompt_token`).
    normalize: L2-normalize the queries (HoReN) or not (GRACE).
    batch_size: prompts per forward pass (the last batch is padded, so shapes stay few).

  Returns:
    float32 array [len(prompts), d_in].
  """
  ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
  length = bucket_length(max(len(x) for x in ids))
  pad = padding_id(tokenizer)

  @jax.jit
  def queries(input_ids_BxT, attention_mask_BxT, prompt_len_B):
    out = forward(model, input_ids_BxT, attention_mask=attention_mask_BxT,
                  hooks=Hooks(capture=(layer,)))
    h_BxTxD = out.captured[layer]
    starts = jnp.zeros_like(prompt_len_B)
    return jax.vmap(lambda h, p, s: make_query(h, p, s, strategy, normalize))(
        h_BxTxD, prompt_len_B - 1, starts)

  chunks = []
  for lo in range(0, len(ids), batch_size):
    part = ids[lo:lo + batch_size]
    input_ids = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    lens = np.ones((batch_size,), np.int32)
    for i, row in enumerate(part):
      input_ids[i, :len(row)], mask[i, :len(row)], lens[i] = row, 1, len(row)
    chunks.append(queries(input_ids, mask, lens)[:len(part)])
  return np.asarray(jnp.concatenate(chunks), np.float32)


def _best_match(keys_NxD: np.ndarray, q_MxD: np.ndarray, cosine: bool, chunk: int = 2048
                ) -> tuple[np.ndarray, np.ndarray]:
  """(index, score) of each query's best key: highest dot product (cosine) or nearest (Euclidean,
  score = distance)."""
  keys = jnp.asarray(keys_NxD)
  sq = jnp.sum(keys * keys, axis=1)
  idx, score = [], []
  for lo in range(0, len(q_MxD), chunk):
    q = jnp.asarray(q_MxD[lo:lo + chunk])
    dots = jnp.matmul(q, keys.T, precision=jax.lax.Precision.HIGHEST)
    if cosine:
      j = jnp.argmax(dots, axis=1)
      s = jnp.take_along_axis(dots, j[:, None], axis=1)[:, 0]
    else:
      d2 = jnp.maximum(jnp.sum(q * q, axis=1)[:, None] - 2 * dots + sq[None, :], 0.0)
      j = jnp.argmin(d2, axis=1)
      s = jnp.sqrt(jnp.take_along_axis(d2, j[:, None], axis=1)[:, 0])
    idx.append(np.asarray(j))
    score.append(np.asarray(s))
  return np.concatenate(idx), np.concatenate(score)


def _quantiles(x: np.ndarray) -> dict[str, float]:
  q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
  return {k: round(float(v), 4) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q)}


def separation(edit_q: np.ndarray, rephrase_q: np.ndarray, unrelated_q: np.ndarray, *,
               cosine: bool, threshold: float) -> dict[str, object]:
  """Routing statistics of one set of stored edits.

  Args:
    edit_q: [N, D] the stored keys (one per edit).
    rephrase_q: [N, D] each edit's rephrasing query (row i belongs to key i).
    unrelated_q: [M, D] unrelated queries.
    cosine: HoReN's rule (highest dot product of normalized vectors, match above `threshold`);
      False: GRACE's (nearest key, match within distance `threshold`).
    threshold: the match threshold (HoReN) or deferral radius (GRACE).

  Returns:
    A dict: `own` (score of each rephrasing against its own key: quantiles), `nearest_unrelated`
    (best score of each unrelated query: quantiles), `rephrase_top1` (share whose best key is its
    own), `rephrase_routed` (top-1 and matching), `unrelated_leak` (share matching any key),
    `auc` (probability that a rephrasing scores its own key better than an unrelated query scores
    its best key).
  """
  n = len(edit_q)
  own = np.einsum("nd,nd->n", edit_q, rephrase_q) if cosine else np.linalg.norm(edit_q - rephrase_q, axis=1)
  best_j, best_s = _best_match(edit_q, rephrase_q, cosine)
  _, unrel_s = _best_match(edit_q, unrelated_q, cosine)
  matches = (best_s > threshold) if cosine else (best_s < threshold)
  unrel_match = (unrel_s > threshold) if cosine else (unrel_s < threshold)
  top1 = best_j == np.arange(n)
  # AUC by ranks: P(own score beats an unrelated best score), ties counted half.
  sign = 1.0 if cosine else -1.0  # higher is better for both
  a, b = sign * own, sign * unrel_s
  order = np.argsort(np.concatenate([a, b]), kind="stable")
  ranks = np.empty(len(order))
  ranks[order] = np.arange(1, len(order) + 1)
  auc = (ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b))
  return {
      "n_edits": n,
      "own": _quantiles(own),
      "nearest_unrelated": _quantiles(unrel_s),
      "rephrase_top1": round(float(top1.mean()), 4),
      "rephrase_routed": round(float((top1 & matches).mean()), 4),
      "unrelated_leak": round(float(unrel_match.mean()), 4),
      "auc": round(float(auc), 4),
  }


def routing_report(model: Model, tokenizer, records: Sequence[EditRecord], *, layer: str,
                   sizes: Sequence[int], horen_threshold: float, horen_strategy: str,
                   grace_radius: float, grace_strategy: str = "last_prompt_token") -> dict:
  """HoReN's and GRACE's view of a stream of edits, for prefixes of `sizes` edits.

  Args:
    model, tokenizer: the unedited model.
    records: edit records with `rephrase` and `loc_prompt` (in stream order).
    layer: the wrapped module.
    sizes: numbers of stored edits to measure (each <= len(records)).
    horen_threshold, horen_strategy: HoReN's match threshold and query strategy.
    grace_radius, grace_strategy: GRACE's initial deferral radius (`grace_eps`) and query strategy.

  Returns:
    {"horen": [separation per size], "grace": [...], "layer", "d_in"}.
  """
  if any(r.rephrase is None or r.loc_prompt is None for r in records):
    raise ValueError("routing_report needs records with a rephrase and a locality prompt")
  if max(sizes) > len(records):
    raise ValueError(f"largest size {max(sizes)} > {len(records)} records")
  records = list(records)[:max(sizes)]
  out: dict[str, object] = {"layer": layer}
  for name, strategy, normalize, threshold in (("horen", horen_strategy, True, horen_threshold),
                                                ("grace", grace_strategy, False, grace_radius)):
    qs = [prompt_queries(model, tokenizer, [getattr(r, f) for r in records], layer=layer,
                         strategy=strategy, normalize=normalize)
          for f in ("prompt", "rephrase", "loc_prompt")]
    out["d_in"] = int(qs[0].shape[1])
    out[name] = [dict(separation(qs[0][:n], qs[1][:n], qs[2][:n], cosine=normalize, threshold=threshold),
                      strategy=strategy, threshold=threshold) for n in sizes]
  return out
