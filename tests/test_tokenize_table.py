"""tokenize_table (bulk) vs tokenize_edits / tokenize_edit pair by pair, and bucket_lengths."""

import numpy as np
import pytest

from _eval_helpers import word_tokenizer
from horse_jax.data.tokenize import (IGNORE, bucket_length, bucket_lengths, tokenize_edit,
                                     tokenize_edits, tokenize_table)

WORDS = "the capital of france is paris rome who wrote hamlet a b c d e f g h".split()


def test_bucket_lengths_match_bucket_length():
  n = np.arange(0, 300)
  assert bucket_lengths(n).tolist() == [bucket_length(int(x)) for x in n]
  assert bucket_lengths(n, minimum=4).tolist() == [bucket_length(int(x), minimum=4) for x in n]


@pytest.mark.parametrize("max_length", [None, 6, 9])
def test_table_equals_pair_by_pair(max_length):
  tok = word_tokenizer(WORDS)
  rng = np.random.default_rng(0)
  prompts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(40)]
  targets = [" ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for _ in range(40)]
  prompts += prompts[:5]  # repeated pairs and texts
  targets += targets[:5]
  table = tokenize_table(tok, prompts, targets, max_length=max_length, rows_per_step=7)
  limit = max_length or 10**9
  assert table.truncated == sum(len(tokenize_edit(tok, p, t)[0]) > limit for p, t in zip(prompts, targets))
  for i, (p, t) in enumerate(zip(prompts, targets)):
    want = tokenize_edits(tok, [p], [t], max_length=max_length, pad_to=table.input_ids.shape[1])
    got = table.batch(np.asarray([i]), table.input_ids.shape[1])
    for name in ("input_ids", "attention_mask", "labels", "prompt_len"):
      np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{name} of {i}")
    assert table.lengths[i] == want.attention_mask.sum()


def test_batch_drops_filler_labels():
  tok = word_tokenizer(WORDS)
  table = tokenize_table(tok, ["the capital of", "who wrote"], ["paris", "hamlet"])
  batch = table.batch(np.asarray([1, 0, 1]), 8, scored=2)
  assert batch.input_ids.shape == (3, 8) and np.all(batch.labels[2] == IGNORE)
  assert np.any(batch.labels[0] != IGNORE) and np.any(batch.labels[1] != IGNORE)


def test_empty_target_is_an_error():
  tok = word_tokenizer(WORDS)
  with pytest.raises(ValueError, match="tokenizes to nothing"):
    tokenize_table(tok, ["the capital of"], [""])
