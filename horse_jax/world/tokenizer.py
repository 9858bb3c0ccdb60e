"""A small byte-level BPE tokenizer for the world, saved so `AutoTokenizer.from_pretrained` loads it.

Byte-level BPE with GPT-2's leading-space convention (" Port" is one token, "Port" another) is what
the real pipeline assumes: edit targets are tokenized as `" " + target`. Like Llama's tokenizer,
`tok(text)` starts with BOS (a post-processor adds it) and `tok(text, add_special_tokens=False)`
does not.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
  """Trains a byte-level BPE on `texts`.

  Args:
    texts: training text (the world's questions and answers).
    vocab_size: target vocabulary size, special tokens and the 256 byte tokens included.

  Returns:
    A `tokenizers.Tokenizer` whose post-processor prepends BOS.
  """
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
  return tok


def save_tokenizer(tok: Tokenizer, folder: str, model_max_length: int = 256) -> None:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
      "add_bos_token": True, "add_eos_token": False,
      "model_max_length": model_max_length,
      "padding_side": "right",
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent=2)


def special_ids(tok: Tokenizer) -> dict[str, int]:
  """{"bos_token_id", "eos_token_id", "pad_token_id"} for the model's config.json."""
  return {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
          "pad_token_id": tok.token_to_id(PAD)}
