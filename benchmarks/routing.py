"""Key-space separability of edits on the embedded world, as HoReN and GRACE route them.

  python -m benchmarks.routing --out eval/results/routing/world.json              # ~13 min
  python -m benchmarks.routing --sizes 100 1000 --distinct 0 --out /tmp/r.json    # test split only

Measures `horse_jax.eval.routing.routing_report` at the world card's HoReN layer and settings: the
1,050 test edits (their held-out rephrasings) and a stream of distinct new-subject edits
(`world.generator.distinct_edits`), for prefixes of the stream. Nothing is edited: it is the
distance structure a codebook router has to work with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from horse_jax.data import load_records
from horse_jax.data.records import EditRecord
from horse_jax.eval.routing import routing_report
from horse_jax.io import atomic_write_json
from horse_jax.models import from_pretrained, load_tokenizer
from horse_jax.world import generator

WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "world")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--world", default=WORLD)
  parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="test-split prefixes")
  parser.add_argument("--distinct", type=int, default=50_000, help="distinct stream length (0: none)")
  parser.add_argument("--distinct-sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
  parser.add_argument("--layer", default="model.layers.1.mlp.down_proj", help="the world card's HoReN layer")
  parser.add_argument("--threshold", type=float, default=0.97, help="the world card's HoReN threshold")
  parser.add_argument("--strategy", default="last_prompt_token", help="the world card's query strategy")
  parser.add_argument("--grace-radius", type=float, default=1.0, help="GRACE's editor.grace_eps")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  path = os.path.join(args.world, "model")
  model, tokenizer = from_pretrained(path), load_tokenizer(path)
  common = dict(layer=args.layer, horen_threshold=args.threshold, horen_strategy=args.strategy,
                grace_radius=args.grace_radius)
  start = time.perf_counter()
  test = load_records(os.path.join(args.world, "data", "zsre_test.json"))
  report = {"test_split": routing_report(model, tokenizer, test, sizes=args.sizes, **common)}
  if args.distinct:
    stream = generator.distinct_edits(generator.build_world(seed=0), args.distinct)
    records = [EditRecord(prompt=e["prompt"], target=e["target_new"], rephrase=e["rephrase"],
                          loc_prompt=e["loc_prompt"], loc_answer=e["loc_answer"]) for e in stream]
    sizes = [n for n in args.distinct_sizes if n <= args.distinct]
    report["distinct_stream"] = routing_report(model, tokenizer, records, sizes=sizes, **common)
  report["seconds"] = round(time.perf_counter() - start, 1)
  report["command"] = "python -m benchmarks.routing " + " ".join(sys.argv[1:] if argv is None else argv)
  atomic_write_json(args.out, report)
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
