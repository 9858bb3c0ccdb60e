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


def _best_other(keys_NxD: np.ndarray, cosine: bool, chunk: int = 2048) -> np.ndarray:
  """Each key's best score against the *other* keys (itself excluded): highest dot product
  (cosine) or smallest Euclidean distance."""
  keys = jnp.asarray(keys_NxD)
  sq = jnp.sum(keys * keys, axis=1)
  out = []
  for lo in range(0, len(keys_NxD), chunk):
    q = keys[lo:lo + chunk]
    dots = jnp.matmul(q, keys.T, precision=jax.lax.Precision.HIGHEST)
    self_mask = jnp.arange(len(keys))[None, :] == (lo + jnp.arange(q.shape[0]))[:, None]
    if cosine:
      out.append(np.asarray(jnp.max(jnp.where(self_mask, -jnp.inf, dots), axis=1)))
    else:
      d2 = jnp.maximum(jnp.sum(q * q, axis=1)[:, None] - 2 * dots + sq[None, :], 0.0)
      out.append(np.asarray(jnp.sqrt(jnp.min(jnp.where(self_mask, jnp.inf, d2), axis=1))))
  return np.concatenate(out)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(a positive scores above a negative) by ranks, ties counted half (higher = better)."""
  both = np.concatenate([pos, neg])
  _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
  # mid-ranks: ties share the mean of the ranks they span
  ends = np.cumsum(counts)
  ranks = (ends - (counts - 1) / 2.0)[inv]
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def score_distributions(edit_q: np.ndarray, rephrase_q: np.ndarray, unrelated_q: np.ndarray, *,
                        cosine: bool) -> dict[str, np.ndarray]:
  """The three score populations a router has to tell apart, per prompt.

  Args:
    edit_q: [N, D] the stored keys (one per edit).
    rephrase_q: [N, D] each edit's rephrasing query (row i belongs to key i).
    unrelated_q: [M, D] unrelated (locality) queries.
    cosine: dot products of normalized queries (HoReN; higher = closer) or Euclidean distances of
      raw queries (GRACE; lower = closer).

  Returns:
    {"own": [N] each rephrasing against its own edit's key, "nearest_unrelated": [M] each
    unrelated query against its best key, "nearest_other_edit": [N] each edit's key against the
    best *other* stored key (what a second edit's prompt looks like to the first's key)}.
  """
  own = (np.einsum("nd,nd->n", edit_q, rephrase_q) if cosine
         else np.linalg.norm(edit_q - rephrase_q, axis=1))
  _, unrel = _best_match(edit_q, unrelated_q, cosine)
  other = _best_other(edit_q, cosine) if len(edit_q) > 1 else np.zeros((0,), np.float32)
  return {"own": own, "nearest_unrelated": unrel, "nearest_other_edit": other}


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
    (best score of each unrelated query: quantiles), `nearest_other_edit` (best score of each key
    against the other keys: quantiles), `rephrase_top1` (share whose best key is its own),
    `rephrase_routed` (top-1 and matching), `unrelated_leak` (share matching any key), `auc`
    (probability that a rephrasing scores its own key better than an unrelated query scores its
    best key) and `auc_other_edit` (the same against the other edits' prompts).
  """
  n = len(edit_q)
  dist = score_distributions(edit_q, rephrase_q, unrelated_q, cosine=cosine)
  best_j, best_s = _best_match(edit_q, rephrase_q, cosine)
  unrel_s = dist["nearest_unrelated"]
  matches = (best_s > threshold) if cosine else (best_s < threshold)
  unrel_match = (unrel_s > threshold) if cosine else (unrel_s < threshold)
  top1 = best_j == np.arange(n)
  sign = 1.0 if cosine else -1.0  # higher is better for both
  out = {
      "n_edits": n,
      "own": _quantiles(dist["own"]),
      "nearest_unrelated": _quantiles(unrel_s),
      "rephrase_top1": round(float(top1.mean()), 4),
      "rephrase_routed": round(float((top1 & matches).mean()), 4),
      "unrelated_leak": round(float(unrel_match.mean()), 4),
      "auc": round(_auc(sign * dist["own"], sign * unrel_s), 4),
  }
  if n > 1:
    out["nearest_other_edit"] = _quantiles(dist["nearest_other_edit"])
    out["auc_other_edit"] = round(_auc(sign * dist["own"], sign * dist["nearest_other_edit"]), 4)
  return out


def grace_coverage(keys_CxD: np.ndarray, radius_C: np.ndarray, labels_Cx2: np.ndarray, count: int,
                   edit_q: np.ndarray, rephrase_q: np.ndarray, unrelated_q: np.ndarray
                   ) -> dict[str, object]:
  """Where an *edited* GRACE codebook sends each edit's prompt, its rephrasing and unrelated prompts.

  GRACE's rule: the nearest live key j (Euclidean, rows 1 .. count-1; row 0 is never used) matches
  when d <= radius_j. A rephrasing can be caught by its own edit's ball, by another edit's ball with
  the same label (then it gets that edit's value, which was trained towards the same target), or by
  a ball with another label (a wrong answer).

  Args:
    keys_CxD, radius_C, labels_Cx2, count: the codebook's keys, radii, label keys, live-row count.
    edit_q: [N, D] raw queries of the edits' prompts (their row: where each prompt routes now).
    rephrase_q: [N, D] raw queries of their rephrasings (row i belongs to edit i).
    unrelated_q: [M, D] raw queries of unrelated prompts.

  Returns:
    A dict: `rows` (live keys), `edits`, `radius` (quantiles over rows), `edit_routed`,
    `rephrase_routed` and its split into `rephrase_own_row`, `rephrase_same_label_row` (another
    row with the edit's label) and `rephrase_other_label_row`, `unrelated_routed`, and
    `own_distance_over_radius` (quantiles of d(rephrasing, its edit's row) / that row's radius:
    <= 1 is inside).
  """
  keys = np.asarray(keys_CxD, np.float32)[1:count]
  radius = np.asarray(radius_C, np.float32)[1:count]
  labels = np.asarray(labels_Cx2)[1:count]
  j_e, d_e = _best_match(keys, edit_q, cosine=False)
  j_r, d_r = _best_match(keys, rephrase_q, cosine=False)
  j_u, d_u = _best_match(keys, unrelated_q, cosine=False)
  m_e, m_r, m_u = d_e <= radius[j_e], d_r <= radius[j_r], d_u <= radius[j_u]
  same = np.all(labels[j_r] == labels[j_e], axis=1)
  own_d = np.linalg.norm(np.asarray(rephrase_q, np.float32) - keys[j_e], axis=1)
  share = lambda x: round(float(np.mean(x)), 4)
  return {
      "rows": int(count - 1),
      "edits": int(len(edit_q)),
      "radius": _quantiles(radius),
      "edit_routed": share(m_e),
      "rephrase_routed": share(m_r),
      "rephrase_own_row": share(m_r & (j_r == j_e)),
      "rephrase_same_label_row": share(m_r & (j_r != j_e) & same),
      "rephrase_other_label_row": share(m_r & ~same),
      "unrelated_routed": share(m_u),
      "own_distance_over_radius": _quantiles(own_d / np.maximum(radius[j_e], 1e-12)),
  }


def routing_report(model: Model, tokenizer, records: Sequence[EditRecord], *, layer: str,
                   sizes: Sequence[int], horen_threshold: float, horen_strategy: str,
                   grace_radius: float, grace_strategy: str = "last_prompt_token",
                   scores: dict | None = None) -> dict:
  """HoReN's and GRACE's view of a stream of edits, for prefixes of `sizes` edits.

  Args:
    model, tokenizer: the unedited model.
    records: edit records with `rephrase` and `loc_prompt` (in stream order).
    layer: the wrapped module.
    sizes: numbers of stored edits to measure (each <= len(records)).
    horen_threshold, horen_strategy: HoReN's match threshold and query strategy.
    grace_radius, grace_strategy: GRACE's initial deferral radius (`grace_eps`) and query strategy.
    scores: if a dict, it receives the per-prompt `score_distributions` at the largest size under
      "horen" and "grace" (arrays, e.g. for a plot; not part of the report).

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
    if scores is not None:
      n = max(sizes)
      scores[name] = score_distributions(qs[0][:n], qs[1][:n], qs[2][:n], cosine=normalize)
  return out
