"""`horse-jax edit --method horen|grace --data UNKE.json`: unstructured (UnKE) edits into a codebook.

The same sequential codebook edit as `edit_codebook`, with UnKE prompts and targets (the chat
template when the tokenizer has one; the target is the long answer plus the end-of-turn token,
right-padded to a power-of-two bucket so long answers compile one program per bucket), and UnKE
scoring: greedy generation for the question, the paraphrase and every sub-question, BLEU-1 and
ROUGE-1/2/L recall against the answers (`horse_jax.eval.unke`).

Writes to --out:
  codebook/      orbax state + codebook.safetensors + settings.json (as `edit_codebook`)
  metrics.json   per-record and summary scores (edited model, and the unedited one as `pre_*`), plus
                 extra["immediate"]: each edit's own teacher-forced token accuracy right after it
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import numpy as np
from horse_jax import outputs, progress
from horse_jax.data import unke
from horse_jax.data.tokenize import bucket_length
from horse_jax.editors.codebook import edit as edit_lib
from horse_jax.editors.codebook import infer, persist
from horse_jax.errors import UserError
from horse_jax.eval import unke as unke_eval


def run(args, mesh=None, fsdp: bool = False) -> int:
  """Edits UnKE records in sequence, writes and scores; `mesh`/`fsdp` from `common.setup_devices`."""
  from horse_jax import distributed, export, runtime  # noqa: PLC0415
  from horse_jax.cli.edit_common import resolve  # noqa: PLC0415
  from horse_jax.editors import protocol  # noqa: PLC0415
  from horse_jax.eval.scoring import write_metrics  # noqa: PLC0415
  from horse_jax.models import read_config  # noqa: PLC0415

  if args.method not in ("horen", "grace"):
    raise UserError(f"--data {args.data}: UnKE (unstructured) records are edited with --method horen "
                    f"or grace, not {args.method}")
  if getattr(args, "eval_every", 0):
    raise UserError("--eval-every is not available for UnKE data (every edit is scored at the end)")
  max_new_tokens = getattr(args, "max_new_tokens", None) or unke_eval.DEFAULT_MAX_NEW_TOKENS
  if max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
  if not os.path.isdir(args.model):
    raise UserError(f"--model {args.model!r}: folder not found")

  book, saved = None, None
  if args.codebook:
    book, old = persist.load(args.codebook)
    if old.method != args.method:
      raise UserError(f"--codebook {args.codebook}: a {old.method} codebook, not {args.method}")
    saved = old.to_editor_dict()
  resolved = resolve(args, read_config(args.model), saved)
  with progress.stage("loading model"):
    model, tokenizer = runtime.load_model(args.model, dtype=resolved["model.dtype"], mesh=mesh,
                                          fsdp=fsdp)
  where = f"--codebook {args.codebook}" if args.codebook else None
  try:  # the protocol's codebook edit tokenizes UnKE records with `unke.tokenize_record`
    editor = protocol.make_editor(args.method, model, tokenizer, resolved, codebook=book, mesh=mesh)
  except UserError as err:
    raise UserError(f"{where}: {err}" if where else str(err)) from None
  settings = editor.config
  book = editor.init(jax.random.PRNGKey(args.seed))

  records = unke.load_unke(args.data, skip_invalid=args.skip_invalid, limit=args.n_edits)
  max_length = resolved["data.max_length"] or model.config.max_position_embeddings
  batch_size = int(resolved["eval.batch_size"])
  main = distributed.is_main()  # multi-host: every process edits, process 0 writes and prints
  immediate: list[dict[str, Any]] = []
  cut = 0
  compiles0 = edit_lib.compile_count()
  edit_s = 0.0
  for i, record in enumerate(progress.bar(records, desc=f"{args.method} UnKE edits", unit="edit", disable=not main)):
    full = unke.target_ids(tokenizer, record.target)
    prompt, target = unke.fit_pair(unke.prompt_ids(tokenizer, record.prompt), full, max_length)
    cut += len(target) < len(full)
    t0 = time.time()
    book, (info,) = editor.edit(book, [record])  # one host sync per edit: the loss is checked
    edit_s += time.time() - t0
    if not np.isfinite(info["loss_last"]):
      raise UserError(f"{args.data}: record {i}: the edit loss became {info['loss_last']} "
                      "(lower editor.edit_lr)")
    immediate.append({"index": i, "target_tokens": len(target),
                      "padded_length": bucket_length(len(prompt) + len(target) - 1), **info})
  if cut and main:
    print(f"{args.data}: {cut} answer(s) longer than the context ({max_length} tokens) were cut at "
          "the end for editing", file=sys.stderr)
  compiles = edit_lib.compile_count() - compiles0

  with outputs.output_folder(args.out, overwrite=args.overwrite, active=main,
                             manifest={"command": "edit", "method": args.method}) as out:
    export.save_codebook(os.path.join(out or args.out, "codebook"), book, settings,
                         extra={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data)})
    generate = args.eval_mode == "generate"
    with progress.stage(f"scoring {len(records)} UnKE edits"):
      scores = unke_eval.score_unke(
          records, tokenizer,
          generate_fn=infer.generate_fn(model, book, settings) if generate else None,
          pre_generate_fn=runtime.generate_fn(model) if generate else None,
          logits_fn=infer.logits_fn(model, book, settings), pre_logits_fn=runtime.logits_fn(model),
          max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
          progress=progress.bars_enabled())
    if not main:
      return 0
    imm = {"question_token_acc": float(np.mean([x["edit_acc"] for x in immediate])),
           "added": int(sum(x["added"] for x in immediate)), "records": immediate}
    tree = resolved.tree()
    extra = {
        "data_format": "unke",
        "scoring": {
            "summary": "all edits scored on the final model; pre_* on the unedited model",
            "text": "generation: greedy, up to max_new_tokens (cut to the context), text up to the "
                    "first end-of-turn/eos; bleu1 = clipped unigram precision x brevity penalty on "
                    "whitespace tokens; rouge*_recall from rouge-score (stemmed); sub_question_* are "
                    "averaged within each record against each sub-question's own answer",
            "token_acc": "teacher-forced token accuracy of answer + end-of-turn token",
            "immediate": "each edit's own token accuracy, teacher-forced, right after that edit",
            "prompt": "chat template" if unke.has_chat_template(tokenizer) else "plain text",
        },
        "max_new_tokens": max_new_tokens,
        "immediate": imm,
        "settings": {"editor": settings.to_editor_dict(), "data": tree["data"], "eval": tree["eval"],
                     "model": tree["model"]},
        "effective_settings": resolved.effective(),
        "ignored_settings": resolved.ignored,
        "edit_seconds": edit_s, "edits_per_second": len(records) / max(edit_s, 1e-9),
        "compile_count": compiles, "answers_cut": cut,
        "codebook": {"rows": int(book.count), "capacity": book.capacity, "bytes": book.nbytes()},
        "continued_from": args.codebook,
    }
    write_metrics(os.path.join(out, "metrics.json"), args.method, len(records), scores, extra)
  s = scores["summary"]

  def fmt(key):
    value = s.get(key)
    return "-" if value is None else f"{value:.3f}"

  line = (f"{args.method}: {len(records)} UnKE edits ({imm['added']} new keys, {edit_s:.1f} s, "
          f"{compiles} edit compile(s))  answer token acc {fmt('pre_question_token_acc')} -> "
          f"{fmt('question_token_acc')}")
  if generate:
    line += (f"  question ROUGE-L recall {fmt('pre_question_rougeL_recall')} -> "
             f"{fmt('question_rougeL_recall')}, BLEU-1 {fmt('pre_question_bleu1')} -> "
             f"{fmt('question_bleu1')}; paraphrase ROUGE-L {fmt('pre_para_question_rougeL_recall')} -> "
             f"{fmt('para_question_rougeL_recall')}; sub-questions ROUGE-L "
             f"{fmt('pre_sub_question_rougeL_recall')} -> {fmt('sub_question_rougeL_recall')}")
  print(f"{line}  -> {args.out}")
  return 0
