"""Key-space separability of edits on the embedded world, as HoReN and GRACE route them.

  python -m benchmarks.routing --out eval/results/routing/world.json              # ~13 min
  python -m benchmarks.routing --sizes 100 1000 --distinct 0 --out /tmp/r.json    # test split only
  python -m benchmarks.routing --sizes 100 1000 --distinct 10000 --distinct-sizes 1000 10000 \
      --plot eval/results/routing/separation.png --out eval/results/routing/separation.json
  python -m benchmarks.routing --sizes 100 --distinct 0 --coverage runs/g100=checkpoints/world/data/zsre_test.json \
      --out /tmp/c.json    # after: horse-jax edit ... --method grace --n-edits 100 --out runs/g100

Measures `horse_jax.eval.routing.routing_report` at the world card's HoReN layer and settings: the
1,050 test edits (their held-out rephrasings) and a stream of distinct new-subject edits
(`world.generator.distinct_edits`), for prefixes of the stream. Nothing is edited: it is the
distance structure a codebook router has to work with. `--plot` draws the three score populations
(`routing.score_distributions`: rephrasing vs its own edit, unrelated prompts vs their best key, each
edit vs the nearest other edit) at the largest sizes. `--coverage FOLDER=DATA` reads the codebook of
a finished `horse-jax edit --method grace` run on the first N records of DATA and reports where its
radii send the edits, their rephrasings and the locality prompts (`routing.grace_coverage`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from horse_jax.data import load_records
from horse_jax.data.records import EditRecord
from horse_jax.editors.codebook import persist
from horse_jax.eval.routing import grace_coverage, prompt_queries, routing_report
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
  parser.add_argument("--plot", help="PNG of the score distributions at the largest sizes")
  parser.add_argument("--coverage", nargs="+", default=[], metavar="FOLDER=DATA",
                      help="`horse-jax edit --method grace` output folders and the data they edited")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  path = os.path.join(args.world, "model")
  model, tokenizer = from_pretrained(path), load_tokenizer(path)
  common = dict(layer=args.layer, horen_threshold=args.threshold, horen_strategy=args.strategy,
                grace_radius=args.grace_radius)
  start = time.perf_counter()
  test = load_records(os.path.join(args.world, "data", "zsre_test.json"))
  scores: dict[str, dict] = {"test_split": {}, "distinct_stream": {}}
  report = {"test_split": routing_report(model, tokenizer, test, sizes=args.sizes,
                                         scores=scores["test_split"], **common)}
  if args.distinct:
    stream = generator.distinct_edits(generator.build_world(seed=0), args.distinct)
    records = [EditRecord(prompt=e["prompt"], target=e["target_new"], rephrase=e["rephrase"],
                          loc_prompt=e["loc_prompt"], loc_answer=e["loc_answer"]) for e in stream]
    sizes = [n for n in args.distinct_sizes if n <= args.distinct]
    report["distinct_stream"] = routing_report(model, tokenizer, records, sizes=sizes,
                                               scores=scores["distinct_stream"], **common)
  if args.coverage:
    report["grace_coverage"] = {spec: _coverage(model, tokenizer, spec) for spec in args.coverage}
  if args.plot:
    _plot(scores, report, args.plot)
  report["seconds"] = round(time.perf_counter() - start, 1)
  report["command"] = "python -m benchmarks.routing " + " ".join(sys.argv[1:] if argv is None else argv)
  atomic_write_json(args.out, report)
  print(json.dumps(report, indent=1))
  return 0


def _coverage(model, tokenizer, spec: str) -> dict:
  """grace_coverage of one edited folder (FOLDER=DATA: its first n_edits records, file order)."""
  folder, data = spec.split("=", 1)
  with open(os.path.join(folder, "metrics.json")) as f:
    metrics = json.load(f)
  book, settings = persist.load(os.path.join(folder, "codebook"))
  if settings.method != "grace":
    raise SystemExit(f"{folder}: method {settings.method}, --coverage reads GRACE codebooks")
  records = load_records(data, limit=int(metrics["n_edits"]))
  qs = [prompt_queries(model, tokenizer, [getattr(r, f) for r in records], layer=settings.layer,
                       strategy=settings.query_selection_strategy, normalize=False)
        for f in ("prompt", "rephrase", "loc_prompt")]
  out = grace_coverage(book.keys, book.radius, book.labels, int(book.count), *qs)
  targets = [r.target for r in records]
  out.update(layer=settings.layer, distinct_targets=len(set(targets)),
             measured_gs=metrics["summary"]["rephrase_acc"],
             measured_rephrase_exact=metrics["summary"]["rephrase_exact"])
  return out


def _plot(scores: dict, report: dict, path: str) -> None:
  """Histograms: HoReN cosine (top) and GRACE distance (bottom), test split and distinct stream."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  parts = [k for k in ("test_split", "distinct_stream") if scores.get(k)]
  fig, axes = plt.subplots(2, len(parts), figsize=(6 * len(parts), 7), squeeze=False)
  for col, part in enumerate(parts):
    n = report[part]["horen"][-1]["n_edits"]
    for row, (name, xlabel) in enumerate((("horen", "cosine of normalized queries"),
                                          ("grace", "Euclidean distance of raw queries"))):
      ax, dist = axes[row][col], scores[part][name]
      lo = min(float(np.min(v)) for v in dist.values() if len(v))
      hi = max(float(np.max(v)) for v in dist.values() if len(v))
      bins = np.linspace(lo, hi, 60)
      for key, label in (("own", "rephrasing vs own edit"), ("nearest_unrelated", "locality prompt vs best key"),
                         ("nearest_other_edit", "edit vs nearest other edit")):
        ax.hist(dist[key], bins=bins, alpha=0.5, density=True, label=label)
      rule = report[part][name][-1]["threshold"]
      ax.axvline(rule, color="k", ls="--", lw=1, label=("threshold " if name == "horen" else "radius ") + f"{rule}")
      ax.set_title(f"{name} · {part.replace('_', ' ')} · {n:,} edits")
      ax.set_xlabel(xlabel)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  raise SystemExit(main())
