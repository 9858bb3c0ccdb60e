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
  width = table.input_ids.shape[1]
  for i, (p, t) in enumerate(zip(prompts, targets)):
    ids, labels, plen = tokenize_edit(tok, p, t)  # the per-pair reference, truncated by hand
    cut = max(len(ids) - limit, 0)
    ids, labels, plen = ids[cut:], labels[cut:], max(plen - cut, 1)
    got = table.batch(np.asarray([i]), width + 3)  # wider than the table: padded further
    want_ids = ids + [tok.pad_token_id] * (width + 3 - len(ids))
    assert got.input_ids[0].tolist() == want_ids
    assert got.labels[0].tolist() == labels + [IGNORE] * (width + 3 - len(ids))
    assert got.attention_mask[0].tolist() == [1] * len(ids) + [0] * (width + 3 - len(ids))
    assert got.prompt_len[0] == plen
    assert table.lengths[i] == len(ids)
  batch = tokenize_edits(tok, prompts, targets, max_length=max_length)  # built on the table
  np.testing.assert_array_equal(batch.input_ids, table.input_ids)
  np.testing.assert_array_equal(batch.labels, table.labels)


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
