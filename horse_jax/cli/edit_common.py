"""What every `horse-jax edit` runner shares: settings resolution, loading the model and the records,
the sequential edit loop with its loss check, scoring against the unedited model, and the summary.

  resolved = resolve(args, model_config, saved)     defaults <- card <- codebook <- --config <- --set
  model, tokenizer, records = load(args, resolved, mesh, fsdp)
  state, immediate, seconds = edit_in_chunks(editor, state, records, args, main, between)
  scores = score(records, tokenizer, model, logits_fn, generate_fn, batch_size, main)
  print(summary_line(method, n, scores, head, out))
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from horse_jax import progress
from horse_jax.errors import UserError


def _configs(args) -> list[str]:
  config = getattr(args, "config", None)
  return [] if not config else [config] if isinstance(config, str) else list(config)


def resolve(args, model_config, saved: dict[str, Any] | None = None):
  """The run's `horse_jax.settings.Resolved`.

  Args:
    args: parsed arguments (method, model, config, overrides; seed and dtype when the command has them).
    model_config: the checkpoint's config (its card supplies defaults).
    saved: a continued codebook's own settings (they rank above the card, below --config / --set).

  Returns:
    Resolved settings: defaults <- model card <- `saved` <- --config files <- --set; --seed fills
    editor.seed (methods that have one) and --dtype model.dtype when given.
  """
  from horse_jax.editors import protocol
  resolved = protocol.resolve_settings(args.method, args.model, model_config, codebook=saved,
                                       configs=_configs(args), overrides=args.overrides)
  if getattr(args, "seed", None) is not None:
    protocol.with_seed(resolved, args.seed)
  if getattr(args, "dtype", None):
    resolved.values["model.dtype"], resolved.sources["model.dtype"] = args.dtype, "set"
  return resolved


def require_model(path: str) -> None:
  if not os.path.isdir(path):
    raise UserError(f"--model {path!r}: folder not found")


def load(args, resolved, mesh=None, fsdp: bool = False, load_data: Callable | None = None):
  """(model, tokenizer, records) of the command line: the model on `mesh`, the first --n-edits
  records of --data (read by `load_data`, default `horse_jax.data.loaders.load_records`)."""
  from horse_jax import runtime
  from horse_jax.data.loaders import load_records
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  records = (load_data or load_records)(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  if not records:
    raise UserError(f"{args.data}: no records")
  return model, tokenizer, records


def edit_in_chunks(editor, state, records: Sequence, args, main: bool,
                   between: Callable[[Any, int], None] | None = None, loss_key: str = "loss_last",
                   setting: str = "editor.edit_lr", chunk: int | None = None):
  """Edits `records` in order, in chunks up to each --eval-every point (no host sync per edit).

  Args:
    editor: the method's Editor.
    state: its state before the first record.
    records: the requests, edited one after another.
    args: parsed arguments (eval_every, data, method).
    main: whether this process draws the progress bar.
    between: called as between(state, n_done) after each chunk but the last (re-scoring).
    loss_key: the info key whose non-finite value means the edit diverged.
    setting: the setting named in that error.
    chunk: records per `editor.edit` call (default: up to each --eval-every point, else all).

  Returns:
    (state, immediate, seconds): the final state, each edit's info with its "index", and the time
    spent in `editor.edit`.
  """
  immediate: list[dict[str, Any]] = []
  seconds = 0.0
  bar = progress.bar(total=len(records), desc=f"{args.method} edits", unit="edit", disable=not main)
  step = chunk or getattr(args, "eval_every", 0) or len(records)
  for start in range(0, len(records), step):
    t0 = time.time()
    state, infos = editor.edit(state, records[start:start + step])
    seconds += time.time() - t0
    bar.update(len(infos))
    for i, info in enumerate(infos, start):
      if not np.isfinite(info[loss_key]):
        raise UserError(f"{args.data}: record {i}: the edit loss became {info[loss_key]} "
                        f"(lower {setting})")
      immediate.append({"index": i, **info})
    done = start + len(infos)
    if between is not None and done < len(records):
      between(state, done)
  bar.close()
  if not progress.bars_enabled():
    progress.log(f"{args.method}: {len(records)} sequential edits: {seconds:.1f} s")
  return state, immediate, seconds


def score(records, tokenizer, model, logits_fn, generate_fn=None, batch_size: int | None = None,
          main: bool = True):
  """`horse_jax.eval.scoring.score_records` of the edited model against the unedited `model`
  (teacher-forced; with `generate_fn`, also greedy generation on both)."""
  from horse_jax import runtime
  from horse_jax.eval.scoring import score_records
  kwargs = {} if batch_size is None else {"batch_size": int(batch_size)}
  with progress.stage(f"scoring {len(records)} edits"):
    return score_records(records, tokenizer, logits_fn, runtime.logits_fn(model),
                         generate_fn=generate_fn,
                         pre_generate_fn=runtime.generate_fn(model) if generate_fn else None,
                         max_length=model.config.max_position_embeddings,
                         progress=main and progress.bars_enabled(), **kwargs)


def summary_line(method: str, n_edits: int, scores, head: str, out: str) -> str:
  """One line: `method: N edits (head)  ES .. GS .. loc_acc .. loc_agree ..  -> out`."""
  s = scores["summary"]
  return (f"{method}: {n_edits} edits{f' ({head})' if head else ''}  ES {s.get('edit_acc')}  "
          f"GS {s.get('rephrase_acc')}  loc_acc {s.get('loc_acc')}  loc_agree {s.get('loc_agree')}"
          f"  -> {out}")


def settings_extra(resolved, editor_settings=None) -> dict[str, Any]:
  """metrics.json's settings block: the resolved tree (with the editor's own view when given), every
  setting's value and source, and what was set but does not apply."""
  tree = resolved.tree()
  if editor_settings is not None:
    tree = {"editor": editor_settings.to_editor_dict(), "data": tree["data"], "eval": tree["eval"],
            "model": tree["model"]}
  return {"settings": tree, "effective_settings": resolved.effective(),
          "ignored_settings": resolved.ignored}


def write_and_score(out, args, model, tokenizer, records, edited_model, modules, logits_fn=None,
                    batch_size: int | None = None, main: bool = True):
  """Writes the edited checkpoint and its deltas under `out` (every process: the gathers are
  collective; process 0 writes), then scores `records` on it against `model`.

  Args:
    out: the output folder being built (None on processes that do not write).
    args: parsed arguments (model, eval_mode, max_shard_size).
    model, tokenizer, records: the unedited model, its tokenizer, the edited records.
    edited_model: the edited Model.
    modules: the edited modules (HF names).
    logits_fn: the edited model's logits function (default: its plain forward).
    batch_size: scoring batch size (default `score_records`').
    main: whether this process draws progress.

  Returns:
    `score_records`' result.
  """
  from horse_jax import export, runtime
  from horse_jax.cli.common import max_shard_size
  with progress.stage("writing the edited model"):
    export.save_edit(out, model, edited_model, list(modules), tokenizer_src=args.model,
                     max_shard_size=max_shard_size(args))
  gen = runtime.generate_fn(edited_model) if args.eval_mode == "generate" else None
  return score(records, tokenizer, model, logits_fn or runtime.logits_fn(edited_model), gen,
               batch_size, main)
