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
