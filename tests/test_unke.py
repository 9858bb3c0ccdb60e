"""UnKE unstructured editing: text metrics on hand-computed cases, the loader's errors, chat-template
prompts, generation scoring with a scripted generator, and compile counts for long targets."""

import json
import math

import numpy as np
import pytest

from horse_jax.data import unke
from horse_jax.data.loaders import load_records
from horse_jax.errors import UserError
from horse_jax.eval import text_metrics
from horse_jax.eval import unke as unke_eval

# --------------------------------------------------------------------------------------------------
# Text metrics, computed by hand.


def test_bleu1_hand_computed():
  # 6 candidate tokens, 5 of them in the reference (clipped counts), equal lengths: BP = 1.
  assert text_metrics.bleu1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
  # Clipping: "the" x4 against one "the" counts once; candidate longer than reference: BP = 1.
  assert text_metrics.bleu1("the the the the", "the cat") == pytest.approx(1 / 4)
  # Brevity: 2 of 2 right, but c=2 < r=6: BP = exp(1 - 6/2).
  assert text_metrics.bleu1("the cat", "the cat is on the mat") == pytest.approx(math.exp(-2.0))
  # Whitespace tokens, case and punctuation kept: "cat." != "cat", "The" != "the".
  assert text_metrics.bleu1("The cat.", "the cat") == 0.0
  assert text_metrics.bleu1("", "the cat") == 0.0
  assert text_metrics.bleu1("   ", "the cat") == 0.0


def test_rouge_recall_hand_computed():
  # Reference unigrams: the x2, cat, is, on, mat (6); candidate covers 5. Reference bigrams:
  # the-cat, cat-is, is-on, on-the, the-mat (5); candidate has the-cat, on-the, the-mat. LCS:
  # "the cat on the mat" (5 of 6).
  r = text_metrics.rouge_recall("the cat sat on the mat", "the cat is on the mat")
  assert r["rouge1_recall"] == pytest.approx(5 / 6)
  assert r["rouge2_recall"] == pytest.approx(3 / 5)
  assert r["rougeL_recall"] == pytest.approx(5 / 6)
  # Order matters for ROUGE-2/L only: reference "the cat on the mat", candidate "mat the on":
  # unigrams mat, the, on (3 of 5); no shared bigram; LCS "the on" (2 of 5).
  r = text_metrics.rouge_recall("mat the on", "the cat on the mat")
  assert (r["rouge1_recall"], r["rouge2_recall"], r["rougeL_recall"]) == pytest.approx((0.6, 0.0, 0.4))
  # Recall ignores extra candidate words; lower-cased, punctuation dropped, stemmed.
  r = text_metrics.rouge_recall("Cats, running! and much more text here", "cat runs")
  assert r["rouge1_recall"] == pytest.approx(1.0) and r["rouge2_recall"] == pytest.approx(1.0)
  assert text_metrics.text_scores("", "a b")["rouge1_recall"] == 0.0
  assert set(text_metrics.text_scores("a", "a")) == set(text_metrics.SCORE_NAMES)


# --------------------------------------------------------------------------------------------------
# Loader.

GOOD = {"question": "Who is Bob?", "para_question": "Tell me about Bob.",
        "answer": "Bob is a cat who lives in Paris.", "sub_question": ["Where does Bob live?"],
        "sub_answer": ["Paris"]}


def write(tmp_path, rows, name="unke.json"):
  path = tmp_path / name
  path.write_text(json.dumps(rows))
  return str(path)


def test_loader_maps_fields_and_detects_the_format(tmp_path):
  path = write(tmp_path, [GOOD, dict(GOOD, sub_question=[], sub_answer=[], para_question=None)])
  assert unke.looks_like_unke(path)
  records = load_records(path)
  assert records == unke.load_unke(path)
  r = records[0]
  assert (r.prompt, r.target, r.rephrase) == (GOOD["question"], GOOD["answer"], GOOD["para_question"])
  assert r.portability == (("Where does Bob live?", "Paris"),) and unke.is_unke(r)
  assert records[1].rephrase is None and records[1].portability == ()
  assert unke.record_fields(r)["sub_answer"] == ["Paris"]
  other = write(tmp_path, [{"prompt": "p", "target": "t"}], "generic.json")
  assert not unke.looks_like_unke(other) and not unke.is_unke(load_records(other)[0])


@pytest.mark.parametrize("change, message", [
    ({"question": None}, "record 1: missing field 'question'"),
    ({"answer": "  "}, "record 1: field 'answer' is empty (the new answer)"),
    ({"para_question": 3}, "record 1: field 'para_question' should be a string, got int"),
    ({"sub_answer": ["Paris", "Lyon"]}, "record 1: field 'sub_answer' has 2 item(s) but 'sub_question' has 1"),
    ({"sub_answer": None}, "record 1: missing field 'sub_answer'"),
    ({"sub_answer": [7]}, "record 1: field sub_answer[0] should be a non-empty string"),
    ({"sub_question": [""]}, "record 1: field sub_question[0] should be a non-empty string"),
    ({"sub_question": "Where?", "sub_answer": {"a": 1}}, "record 1: field 'sub_answer' should be a list, got dict"),
])
def test_loader_errors_name_file_record_and_field(tmp_path, change, message):
  path = write(tmp_path, [GOOD, dict(GOOD, **change)])
  with pytest.raises(UserError) as err:
    unke.load_unke(path)
  assert str(err.value) == f"{path}: {message}"


def test_loader_skip_invalid(tmp_path, capsys):
  path = write(tmp_path, [dict(GOOD, answer=""), GOOD])
  records = unke.load_unke(path, skip_invalid=True)
  assert len(records) == 1 and "record 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Prompts: a tokenizer with a chat template, built here.

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["who", "is", "bob", "a", "cat", "tell", "me", "about", "paris", "where", "does", "live"] + [
    f"w{i}" for i in range(60)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(chat: bool):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
  fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
  if chat:
    fast.chat_template = TEMPLATE
  return fast


def ids(*words):
  table = {w: i for i, w in enumerate(SPECIAL + WORDS)}
  return [table[w] for w in words]


def test_chat_template_prompt_and_target():
  tok = make_tokenizer(chat=True)
  assert unke.has_chat_template(tok)
  # User turn, then the assistant header; no BOS added on top of the template's own tokens.
  assert unke.prompt_ids(tok, "who is bob") == ids("<|user|>", "who", "is", "bob", "<|end|>", "<|assistant|>")
  # The end-of-turn token is what the template writes after an assistant turn, not eos.
  assert unke.end_of_turn_id(tok) == ids("<|end|>")[0]
  assert unke.target_ids(tok, "bob is a cat") == ids("bob", "is", "a", "cat", "<|end|>")
  assert unke.stop_ids(tok) == tuple(sorted(ids("</s>", "<|end|>")))
  batch = unke.tokenize_pairs(tok, ["who is bob"], ["bob is a cat"])
  prompt = ids("<|user|>", "who", "is", "bob", "<|end|>", "<|assistant|>")
  target = ids("bob", "is", "a", "cat", "<|end|>")
  assert batch.input_ids.shape == (1, 16)  # 10 tokens -> bucket 16
  assert list(batch.input_ids[0, :10]) == prompt + target[:-1]
  assert list(batch.attention_mask[0]) == [1] * 10 + [0] * 6
  assert list(batch.labels[0]) == [-100] * 5 + target + [-100] * 6
  assert int(batch.prompt_len[0]) == 6


def test_plain_prompt_without_template():
  tok = make_tokenizer(chat=False)
  assert not unke.has_chat_template(tok)
  assert unke.prompt_ids(tok, "who is bob") == ids("<s>", "who", "is", "bob")
  assert unke.end_of_turn_id(tok) == ids("</s>")[0]
  assert unke.target_ids(tok, "bob is a cat") == ids("bob", "is", "a", "cat", "</s>")


def test_fit_pair_cuts_the_answer_tail_first():
  assert unke.fit_pair([1, 2, 3], [4, 5, 6, 7], None) == ([1, 2, 3], [4, 5, 6, 7])
  assert unke.fit_pair([1, 2, 3], [4, 5, 6, 7], 6) == ([1, 2, 3], [4, 5, 6, 7])  # 3 + 4 - 1 = 6
  assert unke.fit_pair([1, 2, 3], [4, 5, 6, 7], 4) == ([1, 2, 3], [4, 5])
  assert unke.fit_pair([1, 2, 3], [4, 5, 6, 7], 2) == ([2, 3], [4])


# --------------------------------------------------------------------------------------------------
# Generation scoring with a scripted generator (independent of any model).

REC = {"question": "who is bob", "para_question": "tell me about bob", "answer": "bob is a cat",
       "sub_question": ["where does bob live", "who is bob"], "sub_answer": ["paris", "a cat"]}


def test_score_unke_with_scripted_generations(tmp_path):
  tok = make_tokenizer(chat=True)
  records = unke.load_unke(write(tmp_path, [REC]))
  prompts = {tuple(unke.prompt_ids(tok, q)): q for q in
             ("who is bob", "tell me about bob", "where does bob live")}
  script = {  # generated text per question; <|end|> ends the answer, the rest is ignored
      "who is bob": "bob is a cat <|end|> w1 w2",
      "tell me about bob": "cat </s> w3",  # eos ends it too
      "where does bob live": "paris <|end|>",
  }
  shapes = []

  def fake_generate(ids_BxL, mask_BxL, n):
    shapes.append((ids_BxL.shape, n))
    out = np.full((ids_BxL.shape[0], n), ids("w0")[0], np.int32)
    for b in range(ids_BxL.shape[0]):
      question = prompts[tuple(int(t) for t, m in zip(ids_BxL[b], mask_BxL[b]) if m)]
      toks = tok(script[question], add_special_tokens=False)["input_ids"][:n]
      out[b, :len(toks)] = toks
    return out

  scores = unke_eval.score_unke(records, tok, fake_generate, max_new_tokens=6, batch_size=2,
                                progress=False)
  r = scores["records"][0]
  assert r["generations"] == {"question": "bob is a cat", "para_question": "cat",
                              "sub_question": ["paris", "bob is a cat"]}
  assert r["question_bleu1"] == pytest.approx(1.0) and r["question_rougeL_recall"] == pytest.approx(1.0)
  # "cat" against "bob is a cat": precision 1, BP exp(1 - 4/1); ROUGE-1 recall 1/4, ROUGE-2 0.
  assert r["para_question_bleu1"] == pytest.approx(math.exp(-3.0))
  assert r["para_question_rouge1_recall"] == pytest.approx(0.25)
  assert r["para_question_rouge2_recall"] == 0.0
  # Sub-questions averaged within the record: "paris" vs "paris" (1.0) and "bob is a cat" vs "a cat"
  # (BLEU-1: 2 of 4 tokens, BP 1 -> 0.5; ROUGE-1/2/L recall 1.0).
  assert r["sub_question_bleu1"] == pytest.approx((1.0 + 0.5) / 2)
  assert r["sub_question_rouge2_recall"] == pytest.approx((0.0 + 1.0) / 2)  # "paris" has no bigram
  assert r["sub_question_rouge1_recall"] == pytest.approx(1.0)
  assert "pre_question_bleu1" not in r and "question_token_acc" not in r
  s = scores["summary"]
  assert s["n_records"] == 1 and s["question_bleu1"] == pytest.approx(1.0)
  assert s["counts"]["sub_question_rougeL_recall"] == 1
  # Prompts of 6, 7 and 7 tokens share the bucket of 8: one generation shape for all four prompts.
  assert {shape for shape, _ in shapes} == {(2, 8)} and {n for _, n in shapes} == {6}


def test_generation_never_runs_past_the_context():
  tok = make_tokenizer(chat=True)
  records = [unke_eval.PromptPair(0, "question", "who is bob", "bob")]
  jobs = list(unke_eval.generation_jobs(records, tok, 4, 512, max_length=20))
  (chunk, ids_, mask, new), = jobs
  assert ids_.shape == (4, 8) and new == 12 and chunk == [0]


# --------------------------------------------------------------------------------------------------
# Long targets: one edit program per power-of-two length bucket.


def _edit_long_targets(lengths, seed):
  """Edits one prompt with answers of the given word counts; returns (padded lengths, compiles)."""
  from horse_jax.editors.codebook import edit, state
  from horse_jax.editors.codebook.settings import CodebookSettings
  from horse_jax.models.init import random_model, tiny_llama_config
  tok = make_tokenizer(chat=True)
  model = random_model(tiny_llama_config(num_layers=1, vocab_size=len(SPECIAL) + len(WORDS)), seed=3)
  st = CodebookSettings(layer="model.layers.0.mlp.down_proj", n_iter=1, initial_capacity=16,
                        seed=seed, hopfield_key_match_threshold=2.0)  # a seed no other test uses: fresh cache entries
  rng = np.random.default_rng(0)
  book = state.init(st, 128, 64)
  before = edit.compile_count()
  padded = []
  for n in lengths:
    answer = " ".join(f"w{i}" for i in rng.integers(0, 60, n))
    batch = unke.tokenize_pairs(tok, ["who is bob"], [answer])
    padded.append(batch.input_ids.shape[1])
    assert int((batch.labels[0] != -100).sum()) == n + 1  # the answer and <|end|>
    book, _ = edit.apply_edit(model, book, batch, 0, st)
  assert int(book.count) == 1 + len(lengths)
  return padded, edit.compile_count() - before


def test_long_targets_of_many_lengths_compile_once():
  # Answers of 140-185 words (+ <|end|>): one 256-token row bucket and one 192-position window
  # (windows round up to powers of two and their 1.5 multiples).
  padded, compiles = _edit_long_targets((140, 160, 185), seed=4242)
  assert padded == [256, 256, 256] and compiles == 1


@pytest.mark.slow
def test_long_targets_compile_once_per_length_bucket():
  padded, compiles = _edit_long_targets((90, 110, 140, 230, 300), seed=4243)
  # One program per (row bucket, window): windows 96, 128, 192, 256, 384.
  assert padded == [128, 128, 256, 256, 512] and compiles == 5


def test_pre_cache_reuses_unedited_results(tmp_path):
  tok = make_tokenizer(chat=True)
  records = unke.load_unke(write(tmp_path, [REC]))
  rows = []

  def pre_generate(ids_BxL, mask_BxL, n):
    rows.append(ids_BxL.shape[0])
    return np.tile(np.asarray(ids("bob", "is", "a", "cat", "<|end|>", "w0"), np.int32)[:n], (ids_BxL.shape[0], 1))

  def post_generate(ids_BxL, mask_BxL, n):
    return np.full((ids_BxL.shape[0], n), ids("</s>")[0], np.int32)  # says nothing

  cache = {}
  first = unke_eval.score_unke(records, tok, post_generate, pre_generate, max_new_tokens=6,
                               batch_size=4, progress=False, pre_cache=cache)
  calls = len(rows)
  again = unke_eval.score_unke(records, tok, post_generate, pre_generate, max_new_tokens=6,
                               batch_size=4, progress=False, pre_cache=cache)
  assert calls == 1 and len(rows) == 1  # the second call generated nothing with the unedited model
  assert again == first
  s = first["summary"]
  assert s["pre_question_rouge1_recall"] == pytest.approx(1.0) and s["question_rouge1_recall"] == 0.0
  assert first["records"][0]["generations"]["question"] == ""


@pytest.mark.slow
def test_cli_edit_with_a_chat_template_tokenizer(tmp_path):
  from horse_jax.cli.main import main
  from horse_jax.models import load_tokenizer, save_pretrained
  from horse_jax.models.init import random_model, tiny_llama_config
  make_tokenizer(chat=True).save_pretrained(str(tmp_path / "tok"))
  assert unke.has_chat_template(load_tokenizer(str(tmp_path / "tok")))  # the template survives saving
  model = random_model(tiny_llama_config(num_layers=2, vocab_size=len(SPECIAL) + len(WORDS)), seed=5)
  save_pretrained(model, str(tmp_path / "llama"), tokenizer_src=str(tmp_path / "tok"))
  data = write(tmp_path, [REC, dict(REC, question="where does bob live", answer=" ".join(["w7"] * 40))])
  out = tmp_path / "out"
  assert main(["edit", "--method", "horen", "--model", str(tmp_path / "llama"), "--data", data,
               "--eval", "generate", "--max-new-tokens", "6", "--set", "editor.n_iter=5",
               "--set", "editor.edit_lr=1.0", "--set", "eval.batch_size=4", "--out", str(out)]) == 0
  metrics = json.loads(out.joinpath("metrics.json").read_text())
  assert metrics["scoring"]["prompt"] == "chat template" and metrics["n_edits"] == 2
  assert [r["target_tokens"] for r in metrics["immediate"]["records"]] == [5, 41]  # answer + <|end|>
  assert [r["padded_length"] for r in metrics["immediate"]["records"]] == [16, 64]
  assert metrics["compile_count"] == 2
  assert set(metrics["records"][0]["generations"]) == {"question", "para_question", "sub_question"}
  assert 0.0 <= metrics["summary"]["question_rougeL_recall"] <= 1.0
