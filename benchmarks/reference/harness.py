"""Per-edit seconds of one method, the HoReN reference code's and ours, same model and records.

Both sides edit the same records of the same checkpoint one request per call, as the reference's
sequential runner does (`BaseEditor.edit_requests(sequential_edit=True)` calls the method's apply
function with `[request]`, `copy=False`), one side after the other in this process: the reference
first, under torch on the CPU (`shim.cpu`), then ours through the editor protocol. The first
`n_warm` edits of each side are not timed (our compilation; the reference's context templates and
statistics file reads); the next ones are, each call on its own (ours waits for its arrays).

Hparams: the reference reads its own `hparams/<DIR>/llama3-8b.yaml` from the checkout, ours reads
this repository's copy of the same file (HoReN and GRACE, which have no copy here, the checkout's),
both as written, with the same changes on both sides:
  - the model is the one given (the files' `model_name` and `device` name the reference's own);
  - float32 on both sides (`bf16`/`half` of the files are GPU choices; fp16 matmuls on a CPU are
    not what either side would run there);
  - `steps`: reduced iteration counts, given by their reference names (`n_iter`,
    `v_num_grad_steps`), applied to both sides alike.
Besides: GRACE's `eps: 1` reaches the reference as 1.0 (`REFERENCE_FIXES`), ours reads HoReN's file
without `lora_edit_lr` (`OURS_WITHOUT`), and torch runs one intra-op thread (`TORCH_THREADS`).
ROME/MEMIT/AlphaEdit use one second-moment matrix C per edited module on both sides: ours computes
it (`horse_jax.editors.locate.stats`, the world's pre-training text) and the same matrix is written
into the reference's statistics cache (its `layer_stats` npz layout), so neither side times it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Any, Mapping, Sequence

from benchmarks.reference import shim


@dataclasses.dataclass(frozen=True)
class Spec:
  """How one method is driven on each side.

  Attributes:
    ours: our method name (`horse_jax.settings.SETTINGS_CLASSES`).
    folder: its folder under `hparams/` (reference's and ours).
    module: the reference module holding the apply function (below `src`).
    apply: the apply function's name there, or "Class.method" for an executor class.
    hparams_module: the reference module of the hparams class.
    hparams_class: the hparams class (its `from_hparams(path)` reads the file).
    locate: a ROME/MEMIT/AlphaEdit method (needs the statistics C).
    left_pad: the reference pads left (its BaseEditor does for every method but the locate family).
  """

  ours: str
  folder: str
  module: str
  apply: str
  hparams_module: str
  hparams_class: str
  locate: bool = False
  left_pad: bool = True


SPECS: dict[str, Spec] = {
    "ultraedit": Spec("ultraedit", "ULTRAEDIT", "models.ultraedit.ultraedit_main",
                      "UltraEditRewriteExecutor.apply_to_model",
                      "models.ultraedit.ultraedit_hparams", "UltraEditHyperParams"),
    "alphaedit": Spec("alphaedit", "AlphaEdit", "models.alphaedit.AlphaEdit_main",
                      "apply_AlphaEdit_to_model", "models.alphaedit.AlphaEdit_hparams",
                      "AlphaEditHyperParams", locate=True, left_pad=False),
    "memit": Spec("memit", "MEMIT", "models.memit.memit_main", "apply_memit_to_model",
                  "models.memit.memit_hparams", "MEMITHyperParams", locate=True, left_pad=False),
    "rome": Spec("rome", "ROME", "models.rome.rome_main", "apply_rome_to_model",
                 "models.rome.rome_hparams", "ROMEHyperParams", locate=True, left_pad=False),
    "wise": Spec("wise", "WISE", "models.wise.wise_main", "apply_wise_to_model",
                 "models.wise.wise_hparams", "WISEHyperParams"),
    "defer": Spec("defer", "DEFER", "models.defer.defer_main", "apply_defer_to_model",
                  "models.defer.defer_hparams", "DeferHyperParams"),
    "grace": Spec("grace", "GRACE", "models.grace.grace_main", "apply_grace_to_model",
                  "models.grace.grace_hparams", "GraceHyperParams"),
    "horen": Spec("horen", "HOREN", "models.horen.horen_main", "apply_horen_to_model",
                  "models.horen.horen_hparams", "HORENHyperParams"),
}
HPARAMS_FILE = "llama3-8b.yaml"
# Values of the reference's files that its own code cannot run with, given as the same value of the
# type it needs (ours reads the files as written): GRACE's `eps: 1` is read as an int, its
# epsilons become an integer tensor, and the first key whose radius is split (two labels within
# one ball) fails in an index put of a float into it.
REFERENCE_FIXES = {"grace": {"eps": 1.0}}
# Keys of a reference file that our settings reader refuses and that the file's own settings do
# not use: ours reads a copy without them (HOREN's `lora_edit_lr` is the learning rate of the
# LoRA adapter mode; the file edits in `adapter_mode: value`).
OURS_WITHOUT = {"horen": ("lora_edit_lr",)}
# The reference name of each side's iteration count (what `steps` may reduce), per method.
STEP_KEYS = {"rome": "v_num_grad_steps", "memit": "v_num_grad_steps",
             "alphaedit": "v_num_grad_steps", "wise": "n_iter", "defer": "n_iter",
             "grace": "n_iter", "horen": "n_iter"}
# torch's intra-op threads for the reference: at these sizes one thread is faster, and on a shared
# CPU OpenMP workers waiting for each other at every operation made a forward and backward of the
# 32-layer model 7-17x slower with two threads than with one (0.84 s vs 6.3-14.8 s, load 19).
TORCH_THREADS = 1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spec_of(method: str) -> Spec:
  if method not in SPECS:
    raise ValueError(f"no reference benchmark for {method!r} (one of {', '.join(SPECS)})")
  return SPECS[method]


def hparams_paths(method: str, code_dir: str) -> tuple[str, str]:
  """(the reference's hparams file in the checkout, ours: this repository's copy or the same)."""
  spec = spec_of(method)
  theirs = os.path.join(code_dir, "hparams", spec.folder, HPARAMS_FILE)
  ours = os.path.join(REPO, "hparams", spec.folder, HPARAMS_FILE)
  return theirs, ours if os.path.isfile(ours) else theirs


def our_config(method: str, code_dir: str, work: str) -> str:
  """The hparams file ours reads: `hparams_paths`'s, or a copy under `work` without the keys of
  `OURS_WITHOUT` (the only change)."""
  import yaml  # noqa: PLC0415
  path = hparams_paths(method, code_dir)[1]
  if method not in OURS_WITHOUT:
    return path
  with open(path, encoding="utf-8") as f:
    tree = yaml.safe_load(f)
  for key in OURS_WITHOUT[method]:
    tree.pop(key, None)
  os.makedirs(work, exist_ok=True)
  copy = os.path.join(work, f"{method}-{HPARAMS_FILE}")
  with open(copy, "w", encoding="utf-8") as f:
    yaml.safe_dump(tree, f)
  return copy


def request_of(record) -> dict[str, Any]:
  """An EditRecord as the reference's runner builds a ZsRE request (`editor._prepare_requests`)."""
  subject = (record.extra or {}).get("subject") or record.prompt.split()[0]
  return {"prompt": record.prompt, "target_new": record.target,
          "ground_truth": record.ground_truth or "<|endoftext|>", "subject": subject,
          "rephrase_prompt": record.rephrase, "loc_prompt": record.loc_prompt,
          "locality": {"neighborhood": {"prompt": record.loc_prompt,
                                        "ground_truth": record.loc_answer}},
          "portability": {}}


def write_reference_stats(stats_dir: str, model_dir: str, covs: Mapping[str, Any],
                          n_samples: int, dataset: str = "wikipedia") -> None:
  """C per module as the reference's `layer_stats` cache reads it: an npz of its `SecondMoment`
  state (`mom2.mom2` = C with `mom2.count` = 1, so its moment() is C) and `sample_size`, at
  `<stats_dir>/<model folder name>/<dataset>_stats/<module>_float32_mom2_<n>.npz`."""
  import numpy as np  # noqa: PLC0415
  name = os.path.basename(os.path.normpath(model_dir))
  folder = os.path.join(stats_dir, name, f"{dataset}_stats")
  os.makedirs(folder, exist_ok=True)
  for module, cov in covs.items():
    np.savez(os.path.join(folder, f"{module}_float32_mom2_{n_samples}.npz"),
             **{"mom2.mom2": np.asarray(cov, np.float32), "mom2.count": np.int64(1),
                "sample_size": np.int64(n_samples)})


def _stats(method: str, model_dir: str, steps: Mapping[str, Any], work: str, code_dir: str,
           stats_dir: str):
  """Our C of the method's edited modules (computed once, cached under `stats_dir`: shared by
  methods that edit the same modules, MEMIT's and AlphaEdit's), and the number of corpus texts it
  covers (`mom2_n_samples`)."""
  from horse_jax.editors.locate import editor as locate, stats  # noqa: PLC0415
  from horse_jax.editors.protocol import resolve_settings  # noqa: PLC0415
  from horse_jax.runtime import load_model  # noqa: PLC0415
  model, tok = load_model(model_dir)
  config = our_config(method, code_dir, work)
  settings = resolve_settings(method, model_dir, model, configs=[config],
                              overrides=_our_overrides(method, steps, stats_dir))
  cfg = settings.typed.editor
  modules = locate.modules_of(cfg, model.config)
  texts = stats.world_corpus()[:cfg.mom2_n_samples]
  return stats.layer_moments(model, tok, texts, modules, stats_dir=stats_dir,
                             corpus_name="the world's pre-training text"), cfg.mom2_n_samples


def _our_overrides(method: str, steps: Mapping[str, Any], stats_dir: str) -> list[str]:
  out = ["model.dtype=float32"] + [f"editor.{k}={v}" for k, v in steps.items()]
  if spec_of(method).locate:
    out.append(f"editor.stats_dir={stats_dir}")
  return out


def _resolve_apply(module, name: str):
  if "." in name:  # an executor: one instance, as the reference's ALG_DICT holds
    cls, meth = name.split(".")
    return getattr(getattr(module, cls)(), meth)
  return getattr(module, name)


def reference_times(method: str, model_dir: str, records: Sequence[Any], *, code_dir: str,
                    n_warm: int = 1, steps: Mapping[str, Any] | None = None,
                    work: str | None = None, quiet: bool = True, log=None,
                    torch_threads: int | None = TORCH_THREADS) -> list[float]:
  """Seconds of each timed call of the reference's apply function (records[n_warm:]).

  Args:
    method: a key of `SPECS`.
    model_dir: a transformers Llama folder (its name is the reference's `model_name`).
    records: EditRecords, edited in order one per call.
    code_dir: the reference checkout.
    n_warm: leading records edited untimed.
    steps: reduced iteration counts by reference name (also given to ours).
    work: a folder for the statistics cache and AlphaEdit's projector file.
    quiet: silence the reference's prints.
    log: called with a line after each edit (None: nothing).
    torch_threads: torch's intra-op threads while the reference runs (None: torch's default).
  """
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  spec = spec_of(method)
  steps = dict(steps or {})
  work = work or tempfile.mkdtemp(prefix="refbench-")
  theirs, _ = hparams_paths(method, code_dir)
  sink = open(os.devnull, "w") if quiet else None  # noqa: SIM115
  times = []
  threads = torch.get_num_threads()
  if torch_threads:
    torch.set_num_threads(torch_threads)
  try:
    with shim.cpu(), (contextlib.redirect_stdout(sink) if sink else contextlib.nullcontext()):
      module = shim.load(code_dir, spec.module)
      hparams_cls = getattr(shim.load(code_dir, spec.hparams_module), spec.hparams_class)
      hparams = hparams_cls.from_hparams(theirs)
      fixed = {"model_name": model_dir, "device": 0, "bf16": False, "half": False,
               "model_parallel": False, "stats_dir": os.path.join(work, "reference-stats"),
               "P_loc": os.path.join(work, "null_space_project.pt")}
      fixed.update(REFERENCE_FIXES.get(method, {}))
      for key, value in fixed.items():  # run keys: only those this method's class has
        if hasattr(hparams, key):
          setattr(hparams, key, value)
      for key, value in steps.items():  # never silently ignored: ours is given the same
        if not hasattr(hparams, key):
          raise ValueError(f"the reference's {spec.hparams_class} has no {key!r} to reduce")
        setattr(hparams, key, value)
      model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
      model.eval()
      tok = transformers.AutoTokenizer.from_pretrained(model_dir)
      tok.pad_token_id = tok.eos_token_id  # as the reference's BaseEditor does for Llama
      tok.padding_side = "left" if spec.left_pad else "right"
      apply = _resolve_apply(module, spec.apply)
      for i, record in enumerate(records):
        start = time.perf_counter()
        apply(model, tok, [request_of(record)], hparams, copy=False, return_orig_weights=True,
              keep_original_weight=False)
        if i >= n_warm:
          times.append(time.perf_counter() - start)
        if log:
          seconds = time.perf_counter() - start
          log(f"reference {method}: edit {i + 1}/{len(records)} {seconds:.2f} s")
  finally:
    torch.set_num_threads(threads)
    if sink:
      sink.close()
  return times


def our_times(method: str, model_dir: str, records: Sequence[Any], *, n_warm: int = 1,
              steps: Mapping[str, Any] | None = None, work: str | None = None,
              code_dir: str = "", log=None, stats_dir: str | None = None) -> list[float]:
  """Seconds of each timed `edit` call of our editor (records[n_warm:]), one record per call."""
  import jax  # noqa: PLC0415
  from horse_jax.editors.protocol import make_editor, resolve_settings  # noqa: PLC0415
  from horse_jax.runtime import load_model  # noqa: PLC0415
  steps = dict(steps or {})
  work = work or tempfile.mkdtemp(prefix="refbench-")
  model, tok = load_model(model_dir)
  config = our_config(method, code_dir, work)
  settings = resolve_settings(method, model_dir, model, configs=[config],
                              overrides=_our_overrides(method, steps, stats_dir or work))
  editor = make_editor(spec_of(method).ours, model, tok, settings)
  state = editor.init(jax.random.PRNGKey(0))
  times = []
  for i, record in enumerate(records):
    start = time.perf_counter()
    state, _ = editor.edit(state, [record])
    jax.block_until_ready(state)
    if i >= n_warm:
      times.append(time.perf_counter() - start)
    if log:
      log(f"ours {method}: edit {i + 1}/{len(records)} {time.perf_counter() - start:.2f} s")
  return times


def per_edit_seconds(method: str, model_dir: str, records: Sequence[Any], *, code_dir: str,
                     n_warm: int = 1, steps: Mapping[str, Any] | None = None,
                     work: str | None = None, quiet: bool = True, log=None,
                     torch_threads: int | None = TORCH_THREADS,
                     stats_dir: str | None = None) -> dict[str, Any]:
  """Mean seconds per edit of the reference and of ours, one after the other, same model/records.

  Args:
    method: ultraedit | alphaedit | memit | rome | wise | defer | grace | horen.
    model_dir: a transformers Llama folder both sides load (float32).
    records: EditRecords (`horse_jax.data.load_records`); the first `n_warm` are edited untimed.
    code_dir: a checkout of the HoReN reference repository.
    n_warm: untimed leading edits on each side.
    steps: reduced iteration counts by reference name, the same on both sides (e.g. {"n_iter": 10}).
    work: folder for statistics caches (default: a new temporary folder).
    quiet: silence the reference's prints.
    log: called with a line after each edit of either side (None: nothing).
    torch_threads: torch's intra-op threads for the reference (None: torch's default).
    stats_dir: our statistics cache (default `work`; share one between methods).

  Returns:
    {"method", "reference_s", "ours_s" (mean seconds per timed edit), "ratio" (reference / ours),
     "edits" (timed per side), "reference_times", "ours_times", "steps", "torch_threads",
     "load_average"}.
  """
  if len(records) <= n_warm:
    raise ValueError(f"{len(records)} records leave none to time after {n_warm} warm-up edits")
  steps = dict(steps or {})
  work = work or tempfile.mkdtemp(prefix="refbench-")
  stats_dir = stats_dir or work
  if spec_of(method).locate:
    covs, n_samples = _stats(method, model_dir, steps, work, code_dir, stats_dir)
    write_reference_stats(os.path.join(work, "reference-stats"), model_dir, covs, n_samples)
  theirs = reference_times(method, model_dir, records, code_dir=code_dir, n_warm=n_warm,
                           steps=steps, work=work, quiet=quiet, log=log,
                           torch_threads=torch_threads)
  ours = our_times(method, model_dir, records, n_warm=n_warm, steps=steps, work=work,
                   code_dir=code_dir, log=log, stats_dir=stats_dir)
  ref_s, our_s = sum(theirs) / len(theirs), sum(ours) / len(ours)
  return {"method": method, "reference_s": ref_s, "ours_s": our_s, "ratio": ref_s / our_s,
          "edits": len(ours), "reference_times": theirs, "ours_times": ours, "steps": steps,
          "torch_threads": torch_threads, "load_average": os.getloadavg()[0]}
