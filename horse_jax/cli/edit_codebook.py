"""`horse-jax edit --method horen|grace`: sequential edits into a codebook around one layer.

Writes to --out:
  codebook/        orbax state + codebook.safetensors + settings.json (the base model is untouched;
                   edited model = --model + this folder, see `codebook.load_edited_model`)
  metrics.json     every edit scored on the final model (pre-edit model as reference), plus
                   extra["immediate"]: each edit's own ES scored right after it was made
  progress.jsonl   with --eval-every K: all edits so far re-scored every K edits (one line each)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from horse_jax import config as config_lib
from horse_jax.data.tokenize import tokenize_edits
from horse_jax.editors.codebook import edit as edit_lib
from horse_jax.editors.codebook import infer, persist
from horse_jax.editors.codebook import settings as settings_lib
from horse_jax.editors.codebook import state as state_lib
from horse_jax.errors import UserError
from horse_jax.io import atomic_write_text
from horse_jax.models import names


def default_layer(model_path: str, model) -> dict[str, Any]:
  """`editor.*` defaults from the model card (layer, threshold, query strategy), else the
  down-projection of layer round(0.9 L)."""
  card: dict[str, Any] = {}
  try:
    from horse_jax.models.cards import card_for
    card = dict((card_for(model_path, model.config) or {}).get("horen") or {})
  except (ModuleNotFoundError, UserError):
    card = {}
  out: dict[str, Any] = {}
  cfg = model.config
  index = min(int(round(0.9 * cfg.num_layers)), cfg.num_layers - 1)
  out["layer"] = card.get("layer") or names.default_edit_modules(cfg, cfg.num_layers - index)[0]
  if card.get("threshold") is not None:
    out["hopfield_key_match_threshold"] = float(card["threshold"])
  if card.get("query_strategy"):
    out["query_selection_strategy"] = card["query_strategy"]
  out.update(card.get("editor") or {})  # other HoReN `editor.*` defaults of the card (n_iter, ...)
  return out


def resolve_settings(args, model, saved: dict[str, Any] | None) -> dict[str, Any]:
  """defaults (method, model card; or the continued codebook's own) <- --config <- --set."""
  editor = dict(settings_lib.DEFAULTS)
  card = default_layer(args.model, model)
  if args.method == "grace":  # Euclidean balls on the raw input of the last prompt token
    card = {"layer": card["layer"]}
    editor.update(normalize_codebook_keys=False, query_selection_strategy="last_prompt_token")
  editor.update(card)
  if saved:
    editor.update(saved)
  defaults = {"editor": editor, "data": {"max_length": None}, "eval": {"batch_size": 64}}
  return config_lib.resolve(defaults, args.config, args.overrides)


def _score(records, tokenizer, model, book, settings, pre_fn, generate: bool, batch_size: int):
  from horse_jax.eval.scoring import score_records
  from horse_jax.models import generate as base_generate
  gen = pre_gen = None
  if generate:
    gen = infer.generate_fn(model, book, settings)
    pre_gen = lambda ids, mask, n: base_generate(model, ids, mask, n)
  return score_records(records, tokenizer, infer.logits_fn(model, book, settings), pre_fn,
                       batch_size=batch_size, generate_fn=gen, pre_generate_fn=pre_gen,
                       max_length=model.config.max_position_embeddings, progress=False)


def run(args) -> int:
  from horse_jax.cli.edit_hypernet import load_model, logits_fn
  from horse_jax.data.loaders import load_records
  from horse_jax.eval.scoring import summarize, write_metrics

  model, tokenizer = load_model(args.model, args.dtype)
  book, saved = None, None
  if args.codebook:
    book, old = persist.load(args.codebook)
    if old.method != args.method:
      raise UserError(f"--codebook {args.codebook}: a {old.method} codebook, not {args.method}")
    saved = old.to_editor_dict()
  settings_tree = resolve_settings(args, model, saved)
  editor = dict(settings_tree["editor"])
  if not args.codebook and not any(o.startswith("editor.seed=") for o in args.overrides):
    editor["seed"] = args.seed
  settings = settings_lib.from_editor_dict(args.method, editor,
                                           editor["layer"] or default_layer(args.model, model)["layer"])
  d_in, d_out = (int(n) for n in names.get_kernel(model.params, settings.layer).shape)
  if book is None:
    book = state_lib.init(settings, d_in, d_out)
  elif book.keys.shape[1] != d_in or book.values.shape[1] != d_out:
    raise UserError(f"--codebook {args.codebook}: keys/values {book.keys.shape[1]}/"
                    f"{book.values.shape[1]} wide, but {settings.layer} is {d_in} -> {d_out}")

  records = load_records(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  max_length = settings_tree["data"].get("max_length") or model.config.max_position_embeddings
  batch_size = int(settings_tree["eval"]["batch_size"])
  pre_fn = logits_fn(model)
  os.makedirs(args.out, exist_ok=True)
  progress_lines: list[str] = []
  immediate: list[dict[str, Any]] = []
  compiles0 = edit_lib.compile_count()
  edit_s = 0.0
  for i, record in enumerate(tqdm(records, desc=f"{args.method} edits", unit="edit")):
    batch = tokenize_edits(tokenizer, [record.prompt], [record.target], max_length=max_length)
    t0 = time.time()
    book, info = edit_lib.apply_edit(model, book, batch, 0, settings)
    info = {k: v.item() for k, v in jax.device_get(info)._asdict().items()}
    edit_s += time.time() - t0
    if not np.isfinite(info["loss_last"]):
      raise UserError(f"{args.data}: record {i}: the edit loss became {info['loss_last']} "
                      "(lower editor.edit_lr)")
    immediate.append({"index": i, **info})
    if args.eval_every and (i + 1) % args.eval_every == 0 and i + 1 < len(records):
      scores = _score(records[:i + 1], tokenizer, model, book, settings, pre_fn,
                      args.eval_mode == "generate", batch_size)
      progress_lines.append(json.dumps({"n_edits": i + 1, "summary": scores["summary"]}))
      atomic_write_text(os.path.join(args.out, "progress.jsonl"), "\n".join(progress_lines) + "\n")

  persist.save(os.path.join(args.out, "codebook"), book, settings,
               extra={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data)})
  scores = _score(records, tokenizer, model, book, settings, pre_fn, args.eval_mode == "generate",
                  batch_size)
  if args.eval_every:
    progress_lines.append(json.dumps({"n_edits": len(records), "summary": scores["summary"]}))
    atomic_write_text(os.path.join(args.out, "progress.jsonl"), "\n".join(progress_lines) + "\n")
  imm = {"edit_acc": float(np.mean([x["edit_acc"] for x in immediate])),
         "added": int(sum(x["added"] for x in immediate)), "records": immediate}
  extra = {
      "scoring": {"summary": "all edits scored on the final model (p = last prompt token)",
                  "immediate": "each edit's own ES, teacher-forced, right after that edit"},
      "immediate": imm,
      "settings": {"editor": settings.to_editor_dict(), "data": settings_tree["data"],
                   "eval": settings_tree["eval"]},
      "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
      "compile_count": edit_lib.compile_count() - compiles0,
      "codebook": {"rows": int(book.count), "capacity": book.capacity, "bytes": book.nbytes()},
      "continued_from": args.codebook,
  }
  write_metrics(os.path.join(args.out, "metrics.json"), args.method, len(records), scores, extra)
  s = scores["summary"]
  print(f"{args.method}: {len(records)} edits ({imm['added']} new keys, {edit_s:.1f} s)  "
        f"ES right after each edit {imm['edit_acc']:.3f}  final: ES {s.get('edit_acc')}  "
        f"GS {s.get('rephrase_acc')}  loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}"
        f"  -> {args.out}")
  return 0
