"""Invariants of the synthetic world: determinism, no held-out template leak, consistent answers."""

import re

import pytest

from horse_jax.world import generator as g

SMALL = g.WorldSpec(n_subjects=300, n_train_subjects=60, n_val_subjects=20, n_test_subjects=40)


@pytest.fixture(scope="module")
def world():
  return g.build_world(7, SMALL)


def test_same_seed_same_world(world):
  again = g.build_world(7, SMALL)
  assert again.subjects == world.subjects
  assert again.facts == world.facts
  assert again.split_of == world.split_of
  assert again.edits == world.edits
  other = g.build_world(8, SMALL)
  assert other.subjects != world.subjects


def test_default_world_sizes():
  w = g.build_world(0)
  assert len(set(w.subjects)) == len(w.subjects) == g.WorldSpec().n_subjects
  assert len(w.edits["test"]) >= 1000


def test_templates_split_train_and_eval():
  for rel in g.relations():
    assert len(rel.train_templates) == 4 and len(rel.eval_templates) == 2
    # Both word orders are trained, so held-out phrasings of either order recombine seen patterns.
    assert any(t.startswith("{s}") for t in rel.train_templates)
    assert not set(rel.train_templates) & set(rel.eval_templates)
    for t in rel.train_templates + rel.eval_templates:
      assert t.count("{s}") == 1 and t.endswith("?")


def test_first_word_names_the_value():
  # Like real entity names, a value's first word determines the rest, and every value is multi-word.
  for rel in g.relations():
    heads = [v.split()[0] for v in rel.values]
    assert len(set(heads)) == len(heads) == len(set(rel.values)), rel.name
    assert all(len(v.split()) >= 2 for v in rel.values)


def _template_regex(template):
  head, tail = template.split("{s}")
  return re.compile("^" + re.escape(head) + r"[A-Z][a-z]+" + re.escape(tail) + "$")


def test_no_eval_template_in_pretraining(world):
  questions = [q for q, _ in g.pretraining_pairs(world)]
  eval_res = [_template_regex(t) for r in g.relations() for t in r.eval_templates]
  for q in questions:
    assert not any(rx.match(q) for rx in eval_res), q
  # And no rephrase prompt of any edit is a pre-training question.
  rephrases = {e["rephrase"] for split in world.edits.values() for e in split}
  assert not rephrases & set(questions)
  # Every pre-training question is some training template.
  train_res = [_template_regex(t) for r in g.relations() for t in r.train_templates]
  assert all(any(rx.match(q) for rx in train_res) for q in questions)


def test_one_answer_per_subject_relation(world):
  answers = {}
  for q, a in g.pretraining_pairs(world):
    subject = next(s for s in re.findall(r"[A-Z][a-z]+", q) if s in world.facts)
    rel = next(r.name for r in g.relations()
               if any(_template_regex(t).match(q) for t in r.train_templates))
    assert answers.setdefault((subject, rel), a) == a
  assert len(answers) == len(world.subjects) * len(g.relations())
  for rel in g.relations():
    for s in world.subjects:
      assert world.facts[s][rel.name] in rel.values


def test_edits_are_consistent(world):
  rels = {r.name: r for r in g.relations()}
  for split in ("train", "val", "test"):
    for e in world.edits[split]:
      truth = world.facts[e["subject"]][e["relation"]]
      assert e["ground_truth"] == truth
      assert e["target_new"] != truth and e["target_new"] in rels[e["relation"]].values
      assert len(e["target_new"].split()) >= 2  # multi-word answers
      assert e["subject"] in e["prompt"] and e["subject"] in e["rephrase"]
      # Locality: a true fact of a pool subject, asked with a training template.
      loc_subject = next(s for s in re.findall(r"[A-Z][a-z]+", e["loc_prompt"])
                         if s in world.facts)
      assert world.split_of[loc_subject] == "pool"
      assert e["loc_answer"] in world.facts[loc_subject].values()
      loc_rel = next(r for r in g.relations()
                     if any(_template_regex(t).match(e["loc_prompt"]) for t in r.train_templates))
      assert e["loc_answer"] == world.facts[loc_subject][loc_rel.name]


def test_splits_disjoint_by_subject(world):
  subjects = {split: {e["subject"] for e in world.edits[split]} for split in world.edits}
  assert not subjects["train"] & subjects["val"]
  assert not subjects["train"] & subjects["test"]
  assert not subjects["val"] & subjects["test"]
  for split, names in subjects.items():
    assert all(world.split_of[s] == split for s in names)
  assert len(subjects["train"]) == SMALL.n_train_subjects
  assert len(world.edits["test"]) == SMALL.n_test_subjects * len(g.relations())


def test_export_formats(world):
  e = world.edits["test"][0]
  z = g.to_zsre(e)
  assert z["src"] == e["prompt"] and z["alt"] == e["target_new"]
  assert z["answers"] == [e["ground_truth"]] and z["rephrase"] == e["rephrase"]
  assert z["loc"] + "?" == e["loc_prompt"] and z["loc_ans"] == e["loc_answer"]
  c = g.to_counterfact(e, 3)
  assert c["prompt"] == e["prompt"] and c["target_new"] == e["target_new"]
  assert c["ground_truth"] == e["ground_truth"] and c["rephrase_prompt"] == e["rephrase"]
  assert c["locality_prompt"] == e["loc_prompt"] and c["locality_ground_truth"] == e["loc_answer"]
  assert c["case_id"] == 3 and c["subject"] == e["subject"]
