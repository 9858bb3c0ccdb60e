"""Text-overlap scores of a generated answer against a reference answer (UnKE unstructured editing).

  bleu1     BLEU-1-like: clipped unigram precision x brevity penalty, on whitespace tokens (case
            kept, punctuation attached to its word, as `str.split()` leaves it). With c candidate
            and r reference tokens: precision = sum_w min(count_cand(w), count_ref(w)) / c,
            BP = 1 if c > r else exp(1 - r / c); an empty candidate scores 0.
  rouge*_recall  ROUGE-1, ROUGE-2 and ROUGE-L (longest common subsequence) **recall** from the
            `rouge-score` package (Google's re-implementation of ROUGE-1.5.5: lower-cased, non-
            alphanumerics dropped, Porter stemming): the share of the reference's unigrams /
            bigrams / LCS covered by the candidate. Recall, not F1, because an edited model that
            states the new answer and then keeps talking should not be penalized for the rest.
"""

from __future__ import annotations

import collections
import functools
import math

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# The per-text score names, in the order they are reported.
SCORE_NAMES = ("bleu1",) + tuple(f"{t}_recall" for t in ROUGE_TYPES)


def bleu1(candidate: str, reference: str) -> float:
  """BLEU-1-like score of `candidate` against `reference` (see module docstring).

  Args:
    candidate: the generated text.
    reference: the reference answer.

  Returns:
    A float in [0, 1].
  """
  cand, ref = candidate.split(), reference.split()
  if not cand:
    return 0.0
  ref_counts = collections.Counter(ref)
  clipped = sum(min(n, ref_counts[w]) for w, n in collections.Counter(cand).items())
  precision = clipped / len(cand)
  brevity = 1.0 if len(cand) > len(ref) else math.exp(1.0 - len(ref) / len(cand))
  return precision * brevity


@functools.lru_cache(maxsize=1)
def _scorer():
  try:
    from rouge_score import rouge_scorer  # noqa: PLC0415  (only when scoring text)
  except ImportError as err:  # a dependency of the package; missing only in a broken install
    raise ImportError("text scoring needs the `rouge-score` package (pip install rouge-score)") from err
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_recall(candidate: str, reference: str) -> dict[str, float]:
  """ROUGE-1/2/L recall of `candidate` against `reference`.

  Args:
    candidate: the generated text.
    reference: the reference answer.

  Returns:
    {"rouge1_recall", "rouge2_recall", "rougeL_recall"}, floats in [0, 1].
  """
  scores = _scorer().score(reference, candidate)  # rouge-score takes (target, prediction)
  return {f"{t}_recall": float(scores[t].recall) for t in ROUGE_TYPES}


def text_scores(candidate: str, reference: str) -> dict[str, float]:
  """All scores of SCORE_NAMES for one (candidate, reference) pair."""
  return {"bleu1": bleu1(candidate, reference), **rouge_recall(candidate, reference)}
