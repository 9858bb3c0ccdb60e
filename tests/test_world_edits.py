"""`horse-jax world edits`: a lifelong stream of distinct edit requests written to a file that the
loaders (and so `edit --data` and sweeps) read, deterministic for a seed, never clobbering."""

import json

from horse_jax.cli.main import main
from horse_jax.data.loaders import load_records
from horse_jax.world import generator


def _world_dir(tmp_path, seed=3):
  """A world folder as far as `world edits` reads it: world.json's seed and sizes."""
  folder = tmp_path / "w"
  folder.mkdir()
  spec = {"n_subjects": 60, "n_train_subjects": 20, "n_val_subjects": 5, "n_test_subjects": 10}
  (folder / "world.json").write_text(json.dumps({"seed": seed, "world": spec}))
  return folder, generator.build_world(seed, generator.WorldSpec(**spec))


def test_world_edits_file_reloads_and_is_deterministic(tmp_path, capsys):
  folder, world = _world_dir(tmp_path)
  out = tmp_path / "stream.json"
  args = ["world", "edits", "--n", "203", "--seed", "7", "--world", str(folder), "--quiet"]
  assert main([*args, "--out", str(out)]) == 0
  assert "203 edit requests about 41 new subjects" in capsys.readouterr().out
  rows = json.loads(out.read_text())
  assert len(rows) == 203 and len(out.read_text().splitlines()) == 203 + 2  # one record per line
  subjects = {r["subject"] for r in rows}
  assert len(subjects) == 41 and not subjects & set(world.subjects)  # new subjects only
  assert len({(r["subject"], r["src"]) for r in rows}) == 203
  rels = {r.name: r for r in generator.relations()}
  pool = {s for s in world.subjects if world.split_of[s] == "pool"}
  for r in rows:
    rel = next(rels[k] for k in rels if r["src"] in {t.format(s=r["subject"]) for t in rels[k].train_templates})
    assert r["rephrase"] in {t.format(s=r["subject"]) for t in rel.eval_templates}  # held out
    assert r["alt"] in rel.values and r["alt"] != r["pred"]  # counterfactual target
    assert any(r["loc_ans"] in world.facts[s].values() for s in pool if s in r["loc"])
  # Reloads through the loader as ZsRE records, in file order.
  records = load_records(str(out))
  assert [x.prompt for x in records] == [r["src"] for r in rows]
  assert records[0].target == rows[0]["alt"] and records[0].loc_prompt == rows[0]["loc"] + "?"
  # The same seed writes the same bytes; another seed another stream; the library gives the same.
  again = tmp_path / "again.json"
  assert main([*args, "--out", str(again)]) == 0
  assert again.read_bytes() == out.read_bytes()
  assert [generator.to_zsre(e) for e in generator.distinct_edits(world, 203, seed=7)] == rows
  other = tmp_path / "other.json"
  assert main([*args[:5], "8", *args[6:], "--out", str(other)]) == 0
  assert json.loads(other.read_text()) != rows


def test_world_edits_refuses_to_clobber(tmp_path, capsys):
  folder, _ = _world_dir(tmp_path)
  out = tmp_path / "mine.json"
  out.write_text("my data\n")
  base = ["world", "edits", "--n", "5", "--world", str(folder), "--quiet"]
  assert main([*base, "--out", str(out)]) == 2
  assert "file exists" in capsys.readouterr().err and out.read_text() == "my data\n"
  assert main([*base, "--out", str(tmp_path)]) == 2  # a folder
  assert main([*base, "--out", str(folder / "edits.json")]) == 2  # inside the world folder
  assert "inside the input --world" in capsys.readouterr().err
  assert main([*base, "--out", str(tmp_path / "x.json"), "--n", "0"]) == 2
  assert main(["world", "edits", "--n", "5", "--world", str(tmp_path / "none"),
               "--out", str(tmp_path / "y.json"), "--quiet"]) == 2
  assert "world.json does not exist" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
  assert main([*base, "--out", str(out), "--overwrite"]) == 0
  assert len(json.loads(out.read_text())) == 5


def test_default_seed_is_the_benchmark_stream():
  """Seed 0 on the shipped world is the stream `benchmarks/codebook.py --world-distinct` edits."""
  world = generator.build_world(0)
  assert generator.distinct_edits(world, 30, seed=0) == generator.distinct_edits(world, 30)
