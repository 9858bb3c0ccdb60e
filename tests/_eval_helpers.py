"""Shared test helpers for the eval tests: a tiny word-level tokenizer built in memory."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(words, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
  """Whitespace word-level tokenizer with BOS prepended (like Llama's), pad id 0.

  Args:
    words: the vocabulary (duplicates dropped, order kept).
    vocab_size: pad the vocabulary with filler words up to this size.
  """
  vocab = {}
  for w in SPECIALS + list(words):
    vocab.setdefault(w, len(vocab))
  while vocab_size is not None and len(vocab) < vocab_size:
    vocab[f"w{len(vocab)}"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")


class Stopped(BaseException):
  """Stands in for a kill: raised right after a checkpoint's line is written."""


def eval_stopped_after(monkeypatch, argv, n_edits: int) -> None:
  """Runs `horse-jax eval argv`, stopped (as by a kill) right after the curve line of checkpoint
  `n_edits` is on disk; the store's append is restored afterwards."""
  import pytest  # noqa: PLC0415

  from horse_jax.cli.main import main  # noqa: PLC0415
  from horse_jax.eval import sweep  # noqa: PLC0415
  append = sweep.Store.append

  def append_then_stop(self, cells):
    append(self, cells)
    if cells[0]["n_edits"] == n_edits:
      raise Stopped

  monkeypatch.setattr(sweep.Store, "append", append_then_stop)
  with pytest.raises(Stopped):
    main(argv)
  monkeypatch.setattr(sweep.Store, "append", append)
