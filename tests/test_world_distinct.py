"""The 50,000 distinct edit requests for sequential-editing scale runs: distinct, about new subjects,
held-out rephrases, locality from the pool, tokenizable by the world tokenizer, and without touching
the world's own random stream."""

import os

import pytest

from horse_jax.world import generator


@pytest.fixture(scope="module")
def world():
  return generator.build_world(0)


def test_distinct_edits(world):
  edits = generator.distinct_edits(world, 50_000)
  assert len(edits) == 50_000
  assert len({(e["subject"], e["relation"]) for e in edits}) == 50_000
  assert len({e["prompt"] for e in edits}) == 50_000
  assert not {e["subject"] for e in edits} & set(world.subjects)
  rels = {r.name: r for r in generator.relations()}
  pool = {s for s in world.subjects if world.split_of[s] == "pool"}
  for e in edits[:2000]:
    r = rels[e["relation"]]
    assert e["prompt"] in {t.format(s=e["subject"]) for t in r.train_templates}
    assert e["rephrase"] in {t.format(s=e["subject"]) for t in r.eval_templates}
    assert e["target_new"] in r.values and e["target_new"] != e["ground_truth"]
    # A pool subject's fact (a name may contain another, so any subject named in the prompt may do).
    assert any(e["loc_answer"] in world.facts[s].values() for s in pool if s in e["loc_prompt"])
  # Deterministic, and the world's own draws are unchanged by it.
  assert generator.distinct_edits(world, 50_000)[:50] == edits[:50]
  assert generator.build_world(0).edits == world.edits
  assert generator.to_zsre(edits[0])["alt"] == edits[0]["target_new"]


def test_world_tokenizer_reads_new_names(world):
  from horse_jax.world.build import default_world_dir
  path = os.path.join(default_world_dir(), "model")
  if not os.path.isdir(path):
    pytest.skip("no shipped world model")
  from horse_jax.models import load_tokenizer
  tok = load_tokenizer(path)
  for e in generator.distinct_edits(world, 500)[:100]:
    ids = tok(e["prompt"], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).strip() == e["prompt"]
