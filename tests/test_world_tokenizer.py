"""The world tokenizer: loadable by AutoTokenizer, BOS like Llama, edit tokenization of answers."""

import pytest

from horse_jax.data.tokenize import IGNORE, tokenize_edit
from horse_jax.world import generator as g
from horse_jax.world import tokenizer as wt


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  world = g.build_world(3, g.WorldSpec(n_subjects=200, n_train_subjects=40, n_val_subjects=10,
                                       n_test_subjects=20))
  texts = [f"{q} {a}" for q, a in g.pretraining_pairs(world)]
  folder = str(tmp_path_factory.mktemp("tok"))
  wt.save_tokenizer(wt.train_tokenizer(texts, vocab_size=600), folder)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


def test_special_tokens(tok):
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
  ids = tok("Where was Bola born?")["input_ids"]
  assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
  plain = tok("Where was Bola born?", add_special_tokens=False)["input_ids"]
  assert plain == ids[1:]


def test_roundtrip_and_leading_space(tok):
  text = "Which city is the birthplace of Zarnu? Port Avelin"
  assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
  # GPT-2 convention: a word after a space is a different token from the bare word.
  with_space = tok(" Port", add_special_tokens=False)["input_ids"]
  bare = tok("Port", add_special_tokens=False)["input_ids"]
  assert with_space != bare


def test_tokenize_edit_targets_are_answer_tokens(tok):
  prompt, target = "Where was Bola born?", "Port Avelin"
  ids, labels, plen = tokenize_edit(tok, prompt, target)
  prompt_ids = tok(prompt)["input_ids"]
  answer_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
  assert len(answer_ids) >= 2  # multi-token answer
  assert plen == len(prompt_ids) and ids[:plen] == prompt_ids
  assert [x for x in labels if x != IGNORE] == answer_ids
  assert labels[plen - 1] == answer_ids[0]
  assert tok.decode(answer_ids).strip() == target
