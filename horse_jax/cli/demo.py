"""`horse-jax demo`: the whole mission on the embedded default world, offline, on a CPU.

1. HORSE: load the shipped meta-trained hypernetwork (`checkpoints/world/hypernet/`), or meta-train
   one first when it is missing, then edit N held-out counterfactual facts at once.
2. HoReN: the same N facts as N sequential edits into a Hopfield codebook (base weights untouched).
3. Scores before and after (teacher-forced ES, GS, locality vs gold and vs pre-edit), a table on
   stdout, `DIR/results.json`, `DIR/results.md` and a bar chart `DIR/demo.png`.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from horse_jax.errors import UserError

# ES / GS / LS are teacher-forced token accuracies (the reference metrics); "ES whole" is the share of
# edits whose every answer token is right (the world's answers are two-token names, so ES gives half
# credit for the name's second token, which follows from its first).
METRICS = (("edit_acc", "ES"), ("edit_exact", "ES whole"), ("rephrase_acc", "GS"),
           ("loc_acc", "LS (gold)"), ("loc_agree", "LS (agree)"))


def register(sub) -> None:
  p = sub.add_parser("demo", help="HORSE (1,000 edits at once) and HoReN (1,000 sequential edits) on the embedded world")
  p.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
  p.add_argument("--world", default=None, help="world folder [checkpoints/world]")
  p.add_argument("--n-edits", type=int, default=1000, help="facts to edit [1000]")
  p.add_argument("--hypernet", default=None,
                 help="trained HORSE hypernetwork [WORLD/hypernet]; meta-trained first when missing")
  p.add_argument("--train-steps", type=int, default=40,
                 help="meta-training steps when no hypernetwork is shipped [40]")
  p.add_argument("--skip", choices=("horse", "horen"), action="append", default=[],
                 help="leave a method out (repeatable)")
  p.add_argument("--seed", type=int, default=0)
  from horse_jax.cli.common import add_dtype_arg, add_mesh_args, add_overwrite_arg
  add_dtype_arg(p, "default float32")
  add_overwrite_arg(p)
  add_mesh_args(p)
  p.set_defaults(func=run)


def _world_paths(world: str | None) -> dict[str, str]:
  from horse_jax.world.build import default_world_dir
  root = world or default_world_dir()
  paths = {"root": root, "model": os.path.join(root, "model"),
           "train": os.path.join(root, "data", "zsre_train.json"),
           "val": os.path.join(root, "data", "zsre_val.json"),
           "test": os.path.join(root, "data", "zsre_test.json")}
  for key in ("model", "train", "val", "test"):
    if not os.path.exists(paths[key]):
      raise UserError(f"{paths[key]}: missing from the world folder (rebuild it: horse-jax world build)")
  return paths


def _meta_train(paths: dict[str, str], out: str, steps: int, seed: int, mesh=None,
                fsdp: bool = False) -> str:
  """Meta-trains HORSE on the world's training edits on `mesh`; returns the hypernetwork folder."""
  from horse_jax.cli import train as train_cli
  recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "train", "world_horse.yaml")
  args = argparse.Namespace(
      model=paths["model"], data=paths["train"], valid=paths["val"], method="horse",
      out=os.path.join(out, "horse_train"), config=recipe if os.path.exists(recipe) else None,
      overrides=[], steps=steps, save_every=100, valid_every=100, valid_n=None, seed=seed)
  if steps < 1:
    raise UserError("--train-steps must be >= 1")
  print(f"demo: no shipped hypernetwork; meta-training HORSE for {steps} steps -> {args.out}")
  train_cli.train(args, mesh, fsdp)
  return os.path.join(args.out, "hypernet")


def _row(summary: dict[str, Any], pre: bool) -> dict[str, Any]:
  prefix = "pre_" if pre else ""
  row = {}
  for key, _ in METRICS:
    if key == "loc_agree":
      row[key] = None if pre else summary.get(key)  # agreement with itself says nothing
    else:
      row[key] = summary.get(f"{prefix}{key}")
  return row


def _table(results: dict[str, Any]) -> str:
  head = "| method | | " + " | ".join(label for _, label in METRICS) + " | seconds |"
  lines = [head, "|" + "---|" * (len(METRICS) + 3)]
  for method, res in results["methods"].items():
    for when in ("before", "after"):
      vals = " | ".join("-" if res[when][k] is None else f"{res[when][k]:.3f}" for k, _ in METRICS)
      secs = f"{res['edit_seconds']:.1f}" if when == "after" else ""
      lines.append(f"| {res['label']} | {when} | {vals} | {secs} |")
  return "\n".join(lines)


def _plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  methods = list(results["methods"].items())
  fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.8), squeeze=False)
  x = np.arange(len(METRICS))
  for ax, (_, res) in zip(axes[0], methods):
    for offset, when, color in ((-0.2, "before", "#9aa5b1"), (0.2, "after", "#c0392b")):
      vals = [np.nan if res[when][k] is None else res[when][k] for k, _ in METRICS]
      bars = ax.bar(x + offset, vals, 0.4, label=f"{when} editing", color=color)
      ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, [label for _, label in METRICS])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("teacher-forced accuracy")
    ax.set_title(f"{res['label']}: {res['n_edits']} edits {res['mode']}")
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
  fig.suptitle("horse-jax demo, embedded world\nES: edit prompts (token mean; whole: every token), "
               "GS: held-out rephrasings, LS: unrelated",
               fontsize=9)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run(args) -> int:
  from horse_jax import outputs, progress
  from horse_jax.data.loaders import load_records
  from horse_jax.runtime import load_model
  paths = _world_paths(args.world)
  if args.n_edits < 1:
    raise UserError(f"--n-edits must be at least 1, got {args.n_edits}")
  outputs.prepare_output(args.out, inputs={"--world": paths["root"], "--hypernet": args.hypernet},
                         overwrite=getattr(args, "overwrite", False))
  from horse_jax.cli.common import setup_devices
  mesh, fsdp = setup_devices(args, paths["model"])
  with progress.stage("loading model"):
    model, tokenizer = load_model(paths["model"], dtype=getattr(args, "dtype", None), mesh=mesh,
                                  fsdp=fsdp)
  records = load_records(paths["test"], limit=args.n_edits)
  if len(records) < args.n_edits:
    raise UserError(f"{paths['test']}: only {len(records)} records, asked for {args.n_edits}")
  with outputs.output_folder(args.out, overwrite=getattr(args, "overwrite", False),
                             manifest={"command": "demo"}) as out:
    return _run(args, paths, model, tokenizer, records, out, mesh, fsdp)


def _run(args, paths, model, tokenizer, records, out: str, mesh, fsdp: bool) -> int:
  import jax
  from horse_jax import progress
  from horse_jax.runtime import logits_fn
  from horse_jax.eval import methods as methods_lib
  from horse_jax.eval.scoring import PreCache, score_records
  from horse_jax.io import atomic_write_json, atomic_write_text
  pre_logits = logits_fn(model)
  pre_cache = PreCache()

  def score(recs, post_logits_fn, post_generate_fn=None, batch_size=None):
    del post_generate_fn
    with progress.stage(f"scoring {len(recs)} edits"):
      return score_records(recs, tokenizer, post_logits_fn, pre_logits, batch_size=batch_size or 64,
                           max_length=model.config.max_position_embeddings,
                           progress=progress.bars_enabled(), pre_cache=pre_cache)

  ctx = methods_lib.CellContext(model=model, tokenizer=tokenizer, score=score,
                                logits_fn=logits_fn, generate_fn=None, model_path=paths["model"],
                                mesh=mesh)
  results: dict[str, Any] = {"world": paths["root"], "n_edits": len(records), "methods": {}}

  if "horse" not in args.skip:
    hypernet_dir = args.hypernet or os.path.join(paths["root"], "hypernet")
    if not os.path.isdir(hypernet_dir):
      if args.hypernet:
        raise UserError(f"--hypernet {args.hypernet}: folder not found")
      hypernet_dir = _meta_train(paths, out, args.train_steps, args.seed, mesh, fsdp)
      shown = os.path.join(args.out, os.path.relpath(hypernet_dir, out))
    else:
      shown = hypernet_dir
    print(f"demo: HORSE edits {len(records)} facts at once (hypernetwork {shown})")
    start = time.perf_counter()
    with progress.stage(f"HORSE: editing {len(records)} facts at once"):
      scores = methods_lib.BATCH["horse"](ctx, records, {"name": "horse", "hypernet": hypernet_dir},
                                          args.seed)
    seconds = time.perf_counter() - start
    results["methods"]["horse"] = {"label": "HORSE", "mode": "at once", "n_edits": len(records),
                                   "hypernet": shown, "edit_seconds": seconds,
                                   "before": _row(scores["summary"], True),
                                   "after": _row(scores["summary"], False),
                                   "summary": scores["summary"]}

  if "horen" not in args.skip:
    print(f"demo: HoReN edits {len(records)} facts one after another")
    method = methods_lib.SEQUENTIAL["horen"]
    start = time.perf_counter()
    state = method.start(ctx, {"name": "horen"}, args.seed)
    # All requests in one call: still applied one after another (blocks of editor.edit_block edits
    # in one compiled program, the same codebook as one request per call), without a host sync per edit.
    with progress.stage(f"HoReN: {len(records)} sequential edits"):
      state = method.edit(ctx, state, records)
      jax.block_until_ready(state[1])
    seconds = time.perf_counter() - start
    post_logits, _ = method.fns(ctx, state)
    scores = score(records, post_logits)
    results["methods"]["horen"] = {"label": "HoReN", "mode": "in sequence", "n_edits": len(records),
                                   "edit_seconds": seconds, "edits_per_second": len(records) / seconds,
                                   "before": _row(scores["summary"], True),
                                   "after": _row(scores["summary"], False),
                                   "summary": scores["summary"]}

  table = _table(results)
  # The flat layout the issue asks for: {"horse": {"edit_acc", ...}, "horen": {...}}.
  flat = {name: {**res["after"], **{f"pre_{k}": v for k, v in res["before"].items()},
                 "n_edits": res["n_edits"], "edit_seconds": res["edit_seconds"]}
          for name, res in results["methods"].items()}
  atomic_write_json(os.path.join(out, "results.json"), {**flat, "details": results})
  atomic_write_text(os.path.join(out, "results.md"), table + "\n")
  if results["methods"]:
    _plot(results, os.path.join(out, "demo.png"))
  print()
  print(table)
  print(f"\nwrote {args.out}/results.json, results.md, demo.png")
  return 0
