"""score_records vs a per-pair NumPy reference on a bigram "model" (logits depend on the input token)."""

import json

import numpy as np
import pytest

from _eval_helpers import word_tokenizer
from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import tokenize_edit
from horse_jax.eval.scoring import PreCache, score_records, write_metrics

WORDS = ("the capital of france is paris rome who wrote hamlet shakespeare marlowe sky colour blue red "
         "green a b c d e f g h i j").split()


def records():
  return [
      EditRecord("the capital of france is", "rome", rephrase="france capital is",
                 loc_prompt="who wrote hamlet", loc_answer="shakespeare"),
      EditRecord("sky colour is", "green red", rephrase="the sky colour is a b c d e f g h i j",
                 loc_prompt="the colour of sky", loc_answer="blue blue blue"),
      EditRecord("who wrote", "marlowe", portability=(("hamlet was by", "marlowe"), ("a b", "c d"))),
      EditRecord("a", "b c d e", loc_prompt="c", loc_answer="d"),
  ]


def bigram_logits_fn(table):
  """logits[b, t] = table[input_ids[b, t]]: a model whose next token depends on the current one."""
  def fn(batch):
    return table[batch.input_ids]
  return fn


def bigram_generate_fn(table):
  def fn(ids, mask, max_new):
    assert np.all(mask[:, -1] == 1), "prompts must be left-padded"
    last = ids[:, -1]
    out = []
    for _ in range(max_new):
      last = np.argmax(table[last], axis=-1)
      out.append(last)
    return np.stack(out, axis=1)
  return fn


def reference_tf(tok, table, prompt, answer):
  ids, labels, _ = tokenize_edit(tok, prompt, answer)
  hits = [np.argmax(table[ids[j]]) == labels[j] for j in range(len(ids)) if labels[j] != -100]
  return float(np.mean(hits))


def reference_agree(tok, pre, post, prompt, answer):
  ids, labels, _ = tokenize_edit(tok, prompt, answer)
  same = [np.argmax(pre[ids[j]]) == np.argmax(post[ids[j]]) for j in range(len(ids)) if labels[j] != -100]
  return float(np.mean(same))


def greedy(table, prompt_ids, n):
  out, last = [], prompt_ids[-1]
  for _ in range(n):
    last = int(np.argmax(table[last]))
    out.append(last)
  return out


@pytest.fixture(scope="module")
def setup():
  tok = word_tokenizer(WORDS)
  rng = np.random.default_rng(0)
  v = len(tok)
  pre = rng.normal(size=(v, v)).astype(np.float32)
  post = pre.copy()
  post[rng.random(v) < 0.5] = rng.normal(size=(v,)).astype(np.float32)  # "edit" half of the rows
  # Make the first edit perfectly learned: after "is" predict "rome".
  ids = tok.convert_tokens_to_ids
  post[ids("is")] = -5.0
  post[ids("is"), ids("rome")] = 5.0
  return tok, pre, post


def test_teacher_forced_matches_reference(setup):
  tok, pre, post = setup
  recs = records()
  out = score_records(recs, tok, bigram_logits_fn(post), bigram_logits_fn(pre), batch_size=3, progress=False)
  rows = out["records"]
  assert rows[0]["edit_acc"] == 1.0
  for r, row in zip(recs, rows):
    assert row["edit_acc"] == pytest.approx(reference_tf(tok, post, r.prompt, r.target))
    assert row["pre_edit_acc"] == pytest.approx(reference_tf(tok, pre, r.prompt, r.target))
    if r.rephrase:
      assert row["rephrase_acc"] == pytest.approx(reference_tf(tok, post, r.rephrase, r.target))
    else:
      assert "rephrase_acc" not in row
    if r.loc_prompt:
      assert row["loc_acc"] == pytest.approx(reference_tf(tok, post, r.loc_prompt, r.loc_answer))
      assert row["pre_loc_acc"] == pytest.approx(reference_tf(tok, pre, r.loc_prompt, r.loc_answer))
      assert row["loc_agree"] == pytest.approx(reference_agree(tok, pre, post, r.loc_prompt, r.loc_answer))
    if r.portability:
      want = np.mean([reference_tf(tok, post, p, a) for p, a in r.portability])
      assert row["port_acc"] == pytest.approx(want)
  s = out["summary"]
  assert s["n_records"] == 4
  assert s["edit_acc"] == pytest.approx(np.mean([row["edit_acc"] for row in rows]))
  assert s["rephrase_acc"] == pytest.approx(np.mean([rows[0]["rephrase_acc"], rows[1]["rephrase_acc"]]))
  loc = np.mean([rows[i]["loc_agree"] for i in (0, 1, 3)])
  assert s["overall_locality"] == "loc_agree"
  assert s["overall"] == pytest.approx(np.mean([s["edit_acc"], s["rephrase_acc"], loc]))
  assert s["counts"]["loc_agree"] == 3


def test_without_pre_uses_gold_locality(setup):
  tok, _, post = setup
  out = score_records(records(), tok, bigram_logits_fn(post), progress=False)
  s = out["summary"]
  assert "loc_agree" not in s and "pre_edit_acc" not in s
  assert s["overall_locality"] == "loc_acc"
  assert s["overall"] == pytest.approx(np.mean([s["edit_acc"], s["rephrase_acc"], s["loc_acc"]]))


def test_batches_see_few_shapes(setup):
  tok, pre, post = setup
  shapes = set()
  fn = bigram_logits_fn(post)

  def spy(batch):
    shapes.add(batch.input_ids.shape)
    return fn(batch)

  score_records(records() * 5, tok, spy, batch_size=4, progress=False)
  assert all(b == 4 for b, _ in shapes)
  assert {t for _, t in shapes} <= {8, 16}


def test_generation_matches_reference(setup):
  tok, pre, post = setup
  recs = records()
  out = score_records(recs, tok, bigram_logits_fn(post), bigram_logits_fn(pre), batch_size=2,
                      generate_fn=bigram_generate_fn(post), pre_generate_fn=bigram_generate_fn(pre),
                      progress=False)
  for r, row in zip(recs, out["records"]):
    prompt_ids = tok(r.prompt)["input_ids"]
    target = tok(" " + r.target, add_special_tokens=False)["input_ids"]
    got = greedy(post, prompt_ids, len(target))
    assert row["gen_edit_acc"] == pytest.approx(np.mean(np.equal(got, target)))
    assert row["pre_gen_edit_acc"] == pytest.approx(np.mean(np.equal(greedy(pre, prompt_ids, len(target)), target)))
    if r.loc_prompt:
      loc_ids = tok(r.loc_prompt)["input_ids"]
      n = len(tok(" " + r.loc_answer, add_special_tokens=False)["input_ids"])
      agree = np.mean(np.equal(greedy(post, loc_ids, n), greedy(pre, loc_ids, n)))
      assert row["gen_loc_agree"] == pytest.approx(agree)
  s = out["summary"]
  assert s["gen_overall_locality"] == "gen_loc_agree"
  assert s["gen_overall"] == pytest.approx(np.mean([s["gen_edit_acc"], s["gen_rephrase_acc"], s["gen_loc_agree"]]))


def test_long_pairs_truncated_with_warning(setup):
  tok, _, post = setup
  long = EditRecord("the " * 40 + "capital of france is", "rome")
  with pytest.warns(UserWarning, match="max_length=16"):
    out = score_records([long], tok, bigram_logits_fn(post), max_length=16, progress=False)
  # Truncating the prompt start keeps the answer positions, so the score is unchanged.
  assert out["records"][0]["edit_acc"] == pytest.approx(reference_tf(tok, post, long.prompt, long.target))


def test_write_metrics(tmp_path, setup):
  tok, pre, post = setup
  scores = score_records(records(), tok, bigram_logits_fn(post), bigram_logits_fn(pre), progress=False)
  path = tmp_path / "m" / "metrics.json"
  write_metrics(path, "horse", 4, scores, extra={"seconds": 1.5, "method": "ignored"})
  data = json.loads(path.read_text())  # strict JSON (no NaN)
  assert data["method"] == "horse" and data["n_edits"] == 4 and data["seconds"] == 1.5
  assert data["summary"]["edit_acc"] == pytest.approx(scores["summary"]["edit_acc"])
  assert len(data["records"]) == 4
  assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_pre_cache_gives_the_same_scores_and_runs_pre_once(setup):
  tok, pre, post = setup
  calls = {"logits": 0, "generate": 0}
  pre_fn, pre_gen = bigram_logits_fn(pre), bigram_generate_fn(pre)

  def counted_logits(batch):
    calls["logits"] += 1
    return pre_fn(batch)

  def counted_generate(ids, mask, n):
    calls["generate"] += 1
    return pre_gen(ids, mask, n)

  kwargs = dict(batch_size=2, generate_fn=bigram_generate_fn(post), progress=False)
  plain = score_records(records(), tok, bigram_logits_fn(post), bigram_logits_fn(pre),
                        pre_generate_fn=bigram_generate_fn(pre), **kwargs)
  cache = PreCache()
  cached = score_records(records(), tok, bigram_logits_fn(post), counted_logits,
                         pre_generate_fn=counted_generate, pre_cache=cache, **kwargs)
  assert cached == plain
  first = dict(calls)
  assert first["logits"] > 0 and first["generate"] > 0
  again = score_records(records()[1:3], tok, bigram_logits_fn(post), counted_logits,
                        pre_generate_fn=counted_generate, pre_cache=cache, **kwargs)
  assert calls == first  # every pair was cached
  assert again["records"][0]["loc_agree"] == plain["records"][1]["loc_agree"]


def test_summary_whole_answer_shares():
  from horse_jax.eval.scoring import summarize
  # Hand-made per-record scores: token-mean accuracies of 1, 0.5 and 1 (one record has no rephrase).
  per_record = [
      {"index": 0, "prompt": "a", "target": "x", "edit_acc": 1.0, "rephrase_acc": 0.5, "pre_edit_acc": 0.5},
      {"index": 1, "prompt": "b", "target": "y", "edit_acc": 0.5, "rephrase_acc": None, "pre_edit_acc": 0.0},
      {"index": 2, "prompt": "c", "target": "z", "edit_acc": 1.0, "rephrase_acc": 1.0, "pre_edit_acc": 0.5},
  ]
  s = summarize(per_record)
  assert s["edit_acc"] == pytest.approx(2.5 / 3)
  assert s["edit_exact"] == pytest.approx(2 / 3)
  assert s["rephrase_exact"] == pytest.approx(1 / 2) and s["counts"]["rephrase_exact"] == 2
  assert s["pre_edit_exact"] == 0.0
  assert "loc_exact" not in s and "pre_rephrase_exact" not in s


def test_shared_pairs_are_scored_once(setup):
  """Records that share a (prompt, answer) pair (the same locality prompt) get the same scores as
  the per-pair reference, and the shared pair takes one row of one batch."""
  tok, pre, post = setup
  recs = [EditRecord(f"sky colour is {w}", "rome", loc_prompt="who wrote hamlet", loc_answer="shakespeare")
          for w in ("a", "b", "c")]
  rows_seen = []
  fn = bigram_logits_fn(post)

  def spy(batch):
    rows_seen.extend(map(tuple, batch.input_ids[batch.labels.max(axis=1) >= 0]))
    return fn(batch)

  out = score_records(recs, tok, spy, bigram_logits_fn(pre), batch_size=8, progress=False)
  assert len(rows_seen) == 4  # three edit prompts and the one shared locality pair
  for r, row in zip(recs, out["records"]):
    assert row["edit_acc"] == pytest.approx(reference_tf(tok, post, r.prompt, r.target))
    assert row["loc_agree"] == pytest.approx(reference_agree(tok, pre, post, r.loc_prompt, r.loc_answer))
