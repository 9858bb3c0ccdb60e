"""Evaluation: per-row metrics, scoring of edit records, sweeps over methods and edit counts.

  metrics.token_accuracy / agreement / generation_accuracy / overall   jitted per-row kernels
  scoring.score_records(records, tokenizer, post_logits_fn, pre_logits_fn=None, ...)
  scoring.write_metrics(path, method, n_edits, scores, extra=None)
  sweep.run_sweep(settings, out)   (methods x edit counts x seeds -> results.json/.md + plots)
  unke.score_unke(records, tokenizer, generate_fn, pre_generate_fn=None, ...)   UnKE (unstructured)
    edits by greedy generation: text_metrics.bleu1 / rouge_recall against the answers
"""

from horse_jax.eval.metrics import agreement, generation_accuracy, overall, token_accuracy
from horse_jax.eval.scoring import score_records, write_metrics
