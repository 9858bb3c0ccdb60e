"""Editor settings: every key declared once (type, default, meaning), resolved with provenance.

One table, `SETTINGS`, declares each setting of the five editing methods by its reference name
(`editor.n_iter`, `model.edit_modules`, `data.batch_size`, ...), which methods read it, its type,
its default (one value, or one per method) and what it means. Everything else reads its defaults
from here: the hypernetwork and codebook editors, `horse-jax edit`/`train`, evaluation sweeps and
the codebook bench.

A run's settings are built in layers, later layers winning, and each effective value remembers the
layer it came from:

  default   this table
  card      the model card (`models/*.yaml`): edit modules, dtype, HoReN layer/threshold/strategy
  codebook  the settings of a codebook being continued (`horse-jax edit --codebook`)
  config    `--config` files, read as written in any of three layouts:
              - this project's nested layout: {model: {...}, data: {...}, editor: {...}, eval: {...}}
              - a flat EasyEdit hparams file (the HoReN reference's `hparams/HOREN/*.yaml`): editor
                keys without the `editor.` prefix, `inner_params: [model.layers[29].mlp.down_proj
                .weight]` naming the wrapped module, plus run keys listed in `RUN_KEYS`
              - a hydra group of the HORSE reference (`config/editor/horse.yaml`, `config/model/
                <name>.yaml` with `edit_modules`, `config/data/zsre.yaml`; told apart by the folder
                name), or the hydra root `config.yaml` whose `defaults:` list names those groups
  set       `--set key=value` on the command line
  run       the run's own choice where it fills a setting left at its default (`--seed`, a
            sweep's seed -> `editor.seed`)

A key that no layer of the chosen method reads is an error naming the closest valid key: a typo must
never silently fall back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from horse_jax.errors import UserError

HYPERNET = ("horse", "malmen", "mend")
CODEBOOK = ("horen", "grace")
METHODS = HYPERNET + CODEBOOK
SOURCES = ("default", "card", "codebook", "config", "set", "run")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One declared setting.

  Attributes:
    key: dotted reference name, e.g. "editor.n_iter".
    type: "int", "float", "str", "bool" or "modules" (a list of module names).
    default: the value, or {method: value} when methods differ.
    meaning: one line for humans (shown by `describe`).
    methods: the methods that read it.
    optional: None is a valid value (e.g. "from the model card").
    choices: the allowed values of a "str" setting (empty = any).
  """

  key: str
  type: str
  default: Any
  meaning: str
  methods: tuple[str, ...] = METHODS
  optional: bool = False
  choices: tuple[str, ...] = ()

  def default_for(self, method: str) -> Any:
    if isinstance(self.default, Mapping):
      return copy.deepcopy(self.default[method])
    return copy.deepcopy(self.default)


def _per(hypernet=None, horen=None, grace=None, **kw):
  """{method: default} from family values (explicit methods in `kw` win)."""
  out = {m: hypernet for m in HYPERNET}
  out.update(horen=horen, grace=horen if grace is None else grace)
  out.update(kw)
  return out


_H, _C = HYPERNET, CODEBOOK
SETTINGS: tuple[Setting, ...] = (
    # ---- model ----
    Setting("model.edit_modules", "modules", None,
            "edited modules (HF names, config order); None = the model card's, else the last six MLP "
            "output projections", _H, optional=True),
    Setting("model.dtype", "str", None,
            "LM compute dtype; None = the model card's, else float32 (editor solves stay float32)",
            optional=True, choices=("float32", "bfloat16", "float16")),
    # ---- data ----
    Setting("data.n_edits", "int", 32, "edits per meta-training step (`horse-jax train`)", _H),
    Setting("data.batch_size", "int", 32,
            "LM mini-batch size of key/gradient caching (a trained hypernetwork keeps its own unless "
            "this is set by --config or --set: gradient scale depends on it)", _H),
    Setting("data.max_length", "int", None,
            "longest tokenized edit; None = the model's max_position_embeddings", optional=True),
    # ---- hypernetwork editors ----
    Setting("editor.rank", "int", 1920, "rank of the hypernetwork's low-rank blocks (clipped to the width)", _H),
    Setting("editor.n_blocks", "int", 2, "residual blocks per hypernetwork", _H),
    Setting("editor.lr", "float", {"horse": 1e-5, "malmen": 1e-6, "mend": 1e-6},
            "initial editing learning rate (scales the predicted value differences)", _H),
    Setting("editor.meta_lr", "float", 1e-5, "Adam learning rate of meta-training", _H),
    Setting("editor.loc_coef", "float", 1.0, "weight of the locality loss in meta-training", _H),
    Setting("editor.max_grad_norm", "float", 1.0, "global-norm clip of the meta-gradient", _H),
    Setting("editor.n_epochs", "int", 1, "meta-training passes over --data when --steps is not given", _H),
    Setting("editor.batch_size", "int", 1024, "token chunk of the hypernetwork and its backward", _H),
    Setting("editor.token", "str", {"horse": "ans", "malmen": "ans", "mend": "all"},
            "positions whose keys/gradients are cached: answer tokens or every attended token", _H,
            choices=("ans", "all")),
    Setting("editor.spread", "str", "reference", "HORSE spread variant", _H,
            choices=("reference", "gram_schmidt")),
    Setting("editor.memo_cache_mb", "int", 1024,
            "MiB per device for memoizing the unedited model's keys / value gradients of every "
            "training record (`horse-jax train`: the steps then skip the LM over the edit set, "
            "same results); 0, or a memo that does not fit, recomputes them every step as the "
            "reference does", _H),
    # ---- codebook editors ----
    Setting("editor.layer", "str", None,
            "wrapped linear module (HF name); None = the model card's HoReN layer, else the MLP "
            "output projection at depth round(0.9 L)", _C, optional=True),
    Setting("editor.n_iter", "int", 50, "Adam steps per edit", _C),
    Setting("editor.edit_lr", "float", 1.0, "Adam learning rate of a value", _C),
    Setting("editor.adapter_mode", "str", "value", "learned vector per key, or per-key LoRA", _C,
            choices=("value", "lora")),
    Setting("editor.val_init", "str", "cold",
            "new value: uniform [0, 1) (cold) or the layer's own output at p (warm)", _C,
            choices=("cold", "warm")),
    Setting("editor.normalize_codebook_keys", "bool", _per(horen=True, grace=False),
            "L2-normalize queries, keys and Hopfield iterates (GRACE: raw Euclidean keys)", _C),
    Setting("editor.query_selection_strategy", "str",
            _per(horen="last_50_perc_prompt_tokens_avg", grace="last_prompt_token"),
            "query from the layer input: last_prompt_token, first_prompt_token, "
            "last_X_perc_prompt_tokens_avg or last_N_prompt_tokens_avg", _C),
    Setting("editor.hopfield_retrieval_alpha", "float", 0.1, "damping of the Hopfield update", _C),
    Setting("editor.hopfield_retrieval_beta", "float", 20.0, "inverse temperature of retrieval", _C),
    Setting("editor.hopfield_retrieval_eps", "float", 1e-5, "retrieval convergence tolerance", _C),
    Setting("editor.hopfield_retrieval_max_iter", "int", 1, "Hopfield iterations", _C),
    Setting("editor.hopfield_key_match_threshold", "float", 0.75,
            "strict match threshold on the retrieval score (reference range 0.55-0.85 per model)", _C),
    Setting("editor.edit_span", "str", "last",
            "change only y[p] (reference) or also every later position", _C, choices=("last", "onward")),
    Setting("editor.label_match", "str", "mean",
            "same-label test: equal mean of the label array (reference) or exact tokens", _C,
            choices=("mean", "exact")),
    Setting("editor.lora_rank", "int", 4, "LoRA rank per key (adapter_mode lora)", _C),
    Setting("editor.lora_scale", "float", 1.0, "LoRA output scale", _C),
    Setting("editor.grace_eps", "float", 1.0, "GRACE: initial deferral radius of a new key", _C),
    Setting("editor.initial_capacity", "int", 64, "codebook rows preallocated (doubles when full)", _C),
    Setting("editor.edit_block", "int", 16,
            "sequential edits per compiled program (1 = one at a time, the reference loop; every "
            "size gives the same codebook)", _C),
    Setting("editor.seed", "int", 0, "seed of value/LoRA initialisation (--seed sets it)", _C),
    Setting("eval.batch_size", "int", 64, "scoring batch size of `horse-jax edit`", _C),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}

# Keys of the reference config files that are not settings of this project: each is understood
# (mapped or checked) or knowingly ignored, with the reason. EasyEdit (flat HoReN hparams) first.
RUN_KEYS: dict[str, str] = {
    "alg_name": "checked: must name the --method (HOREN, GRACE, MEND, MALMEN, HORSE)",
    "model_name": "ignored: the model is --model (its card is found by folder name)",
    "device": "ignored: JAX places arrays on the available devices (see --mesh)",
    "bf16": "understood: true -> model.dtype bfloat16, false -> float32",
    "fp16": "understood: true -> model.dtype float16",
    "batch_size": "understood: HoReN/GRACE edit one request at a time, so it must be 1",
    "max_length": "understood: -> data.max_length",
    "inner_params": "understood: -> editor.layer (HoReN/GRACE) or model.edit_modules (hypernets)",
    "model_parallel": "ignored: sharding follows --mesh",
    "sequential_edit": "ignored: HoReN/GRACE are always sequential, hypernets always at once",
    "objective_optimization": "ignored: only the reference's target-CE objective exists",
    "eps": "GRACE: -> editor.grace_eps; HoReN: ignored (a GRACE leftover)",
    "dist_fn": "ignored: GRACE/WISE leftover (GRACE here is always Euclidean)",
    "replacement": "ignored: GRACE/WISE leftover (GRACE here always replaces the last prompt token)",
    "num_pert": "ignored: GRACE/WISE leftover",
    "eps_expand": "ignored: GRACE/WISE leftover",
    "val_train": "ignored: GRACE leftover",
    "val_reg": "ignored: GRACE leftover",
    "reg": "ignored: GRACE leftover",
    "dropout": "ignored: GRACE leftover",
    "mask_ratio": "ignored: WISE leftover",
    "norm_constraint": "ignored: WISE leftover",
    "act_margin": "ignored: WISE leftover",
    "act_ratio": "ignored: WISE leftover",
    "save_freq": "ignored: WISE leftover",
    "merge_freq": "ignored: WISE leftover",
    "merge_alg": "ignored: WISE leftover",
    "alpha": "ignored: WISE leftover (HoReN's retrieval damping is hopfield_retrieval_alpha)",
    "beta": "ignored: WISE leftover (HoReN's inverse temperature is hopfield_retrieval_beta)",
    "gamma": "ignored: WISE leftover",
    "weights": "ignored: WISE leftover",
    "densities": "ignored: WISE leftover",
    "retrieve": "ignored: WISE leftover",
    "replay": "ignored: WISE leftover",
    "use_chat_template": "ignored: ZsRE-style prompts are plain text; UnKE records use the chat template",
    "results_dir": "ignored: outputs go to --out",
    "stats_dir": "ignored: no statistics files are read",
    # HORSE reference (hydra groups and root).
    "name": "editor group: checked against --method; other groups: ignored",
    "name_or_path": "ignored: the model is --model",
    "class_name": "ignored: the architecture comes from config.json",
    "half": "understood: true -> model.dtype bfloat16",
    "path": "ignored: the records are --data",
    "train_path": "ignored: the records are --data",
    "valid_path": "ignored: validation records are --valid",
    "cache_dir": "ignored: keys and gradients are cached in memory",
    "load_checkpoint": "ignored: a trained hypernetwork is --hypernet",
    "seed": "ignored in config files: the seed is --seed",
    "model_device": "ignored: JAX places arrays on the available devices",
    "editor_device": "ignored: JAX places arrays on the available devices",
    "hydra": "ignored: hydra bookkeeping",
    "defaults": "understood: the hydra groups to read from the sibling folders",
}

_EASYEDIT_ALG = {"horen": "HOREN", "grace": "GRACE", "mend": "MEND", "malmen": "MALMEN", "horse": "HORSE"}
_HYDRA_GROUPS = ("editor", "model", "data")


def keys_for(method: str) -> list[str]:
  """The dotted keys `method` reads."""
  _check_method(method)
  return [s.key for s in SETTINGS if method in s.methods]


def default(key: str, method: str = "horen") -> Any:
  """The declared default of `key` for `method`."""
  return BY_KEY[key].default_for(method)


def defaults(method: str) -> dict[str, Any]:
  """{dotted key: default} of every setting `method` reads."""
  return {k: BY_KEY[k].default_for(method) for k in keys_for(method)}


def describe(method: str | None = None) -> str:
  """A markdown table of the settings (of one method, or all)."""
  rows = ["| key | type | default | methods | meaning |", "|---|---|---|---|---|"]
  for s in SETTINGS:
    if method and method not in s.methods:
      continue
    if method:
      d = s.default_for(method)
    elif isinstance(s.default, Mapping):
      d = ", ".join(f"{m}: {v}" for m, v in s.default.items() if m in s.methods)
    else:
      d = s.default
    rows.append(f"| `{s.key}` | {s.type} | {d} | {', '.join(s.methods)} | {s.meaning} |")
  return "\n".join(rows)


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise UserError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


# ---- values ----


def coerce(key: str, value: Any, where: str) -> Any:
  """`value` checked and converted to the declared type of `key` (UserError naming `where`)."""
  s = BY_KEY[key]
  if value is None:
    if s.optional:
      return None
    raise UserError(f"{where}: {key} must not be empty")
  bad = UserError(f"{where}: {key}={value!r} is not a valid {s.type}")
  if s.type == "int":
    if isinstance(value, bool):
      raise bad
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, str):
      try:
        value = int(value)
      except ValueError:
        raise bad from None
    if not isinstance(value, int):
      raise bad
    return value
  if s.type == "float":
    if isinstance(value, bool):
      raise bad
    try:
      return float(value)  # YAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
      raise bad from None
  if s.type == "bool":
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    if not isinstance(value, bool):
      raise bad
    return value
  if s.type == "modules":
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value) or not value:
      raise bad
    return [module_name(v) for v in value]
  if not isinstance(value, str):
    raise bad
  if key == "editor.layer":
    value = module_name(value)  # also accept the reference's `model.layers[29].mlp.down_proj.weight`
  if s.choices and value not in s.choices:
    raise UserError(f"{where}: {key}={value!r}: expected one of {', '.join(s.choices)}")
  return value


def module_name(param: str) -> str:
  """A module name from a reference parameter path: `model.layers[29].mlp.down_proj.weight` ->
  `model.layers.29.mlp.down_proj` (EasyEdit writes list indices in brackets)."""
  name = re.sub(r"\[(\d+)\]", r".\1", str(param).strip())
  for suffix in (".weight", ".bias", ".kernel"):
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  return name


def _unknown(key: str, method: str, where: str, shown: str | None = None) -> UserError:
  """The error for a key `method` does not read (`shown`: the key as the user wrote it)."""
  valid = keys_for(method)
  short = {k.split(".", 1)[1]: k for k in valid}
  last = key.split(".")[-1]
  # A short form of a longer name (`alpha` for `hopfield_retrieval_alpha`) beats spelling distance.
  close = [k for k in valid if len(last) >= 3 and k.split(".")[-1].endswith("_" + last)][:1]
  close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not close:
    close = [short[c] for c in difflib.get_close_matches(key.split(".")[-1], list(short), n=1, cutoff=0.5)]
  if close and shown and "." not in shown:
    close = [close[0].split(".", 1)[1]]  # a flat file: suggest the key as it would be written there
  hint = f"; did you mean {close[0]!r}?" if close else ""
  other = [m for m in METHODS if key in BY_KEY and m in BY_KEY[key].methods]
  if other:
    hint = f" (read by {', '.join(other)} only){hint}"
  return UserError(f"{where}: unknown setting {(shown or key)!r} for {method}{hint}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{a: {b: 1}} -> {"a.b": 1}; stops at non-mapping values and at declared keys."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and key not in BY_KEY:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a.b": 1} -> {a: {b: 1}}."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)
  return out


# ---- config files ----


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """A YAML file's top-level mapping (UserError on a bad path or syntax)."""
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: config file not found") from None
  except IsADirectoryError:
    raise UserError(f"{path}: a folder, not a config file") from None
  except yaml.YAMLError as err:
    raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a mapping at the top level")
  return data


@dataclasses.dataclass
class FileSettings:
  """What a config file sets: {dotted key: value}, and the keys knowingly ignored {key: reason}."""

  values: dict[str, Any] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)


def _run_key(method: str, key: str, value: Any, out: FileSettings, where: str, group: str = "") -> None:
  """Handles one reference run key (see RUN_KEYS): maps or checks it, else records it as ignored."""
  understood = True
  if key == "alg_name":
    if str(value).upper() != _EASYEDIT_ALG[method]:
      raise UserError(f"{where}: alg_name {value!r} does not match --method {method}")
  elif key == "name" and group == "editor":
    if str(value).lower() != method:
      raise UserError(f"{where}: editor name {value!r} does not match --method {method}")
  elif key in ("bf16", "half"):
    out.values["model.dtype"] = "bfloat16" if value else "float32"
  elif key == "fp16" and value:
    out.values["model.dtype"] = "float16"
  elif key == "batch_size" and method in CODEBOOK:
    if int(value) != 1:
      raise UserError(f"{where}: batch_size={value}: {method} edits one request at a time (use 1)")
  elif key == "max_length":
    out.values["data.max_length"] = value
  elif key == "inner_params":
    mods = [module_name(p) for p in (value if isinstance(value, (list, tuple)) else [value])]
    if method in CODEBOOK:
      if len(mods) != 1:
        raise UserError(f"{where}: inner_params: {method} wraps exactly one module, got {len(mods)}")
      out.values["editor.layer"] = mods[0]
    else:
      out.values["model.edit_modules"] = mods
  elif key == "eps" and method == "grace":
    out.values["editor.grace_eps"] = value
  elif key == "batch_size":
    out.ignored[key] = "ignored: HORSE/MALMEN/MEND edit all records at once (see data.batch_size)"
    return
  else:
    understood = False
  if not understood:
    out.ignored[key] = RUN_KEYS[key]


# The run keys a group (hydra group file, or a group of the nested layout) may hold: the HORSE
# reference's bookkeeping. Inside groups every other unknown key is an error (`editor: {alpha: ..}`
# must not be taken for a WISE leftover).
_GROUP_RUN_KEYS = ("name", "name_or_path", "class_name", "half", "path", "train_path", "valid_path",
                   "cache_dir", "load_checkpoint", "batch_size", "max_length")

# Keys a flat EasyEdit file holds as run keys although a hydra editor group has a setting of that
# name (EasyEdit's batch_size is edits per request, MALMEN's editor batch_size is a token chunk).
_EASYEDIT_RUN_FIRST = ("batch_size", "max_length", "seed")


def _flat_file(method: str, data: Mapping[str, Any], where: str, group: str = "") -> FileSettings:
  """An EasyEdit hparams file (group "") or a hydra group: keys without the group prefix."""
  out = FileSettings()
  prefix = {"model": "model.", "data": "data.", "eval": "eval."}.get(group, "editor.")
  for key, value in data.items():
    key = str(key)
    full = key if key in BY_KEY else prefix + key
    if group == "" and key in _EASYEDIT_RUN_FIRST:
      _run_key(method, key, value, out, where, group)
    elif full in BY_KEY and method in BY_KEY[full].methods:
      out.values[full] = value
    elif key in RUN_KEYS and (group == "" or key in _GROUP_RUN_KEYS):
      _run_key(method, key, value, out, where, group)
    else:
      raise _unknown(full, method, where, shown=key if group == "" else None)
  return out


def read_config(path: str | os.PathLike, method: str) -> FileSettings:
  """Reads one `--config` file in any supported layout (see the module docstring)."""
  _check_method(method)
  where = os.fspath(path)
  data = load_yaml(path)
  folder = Path(path).resolve().parent
  easyedit = "alg_name" in data or "inner_params" in data
  if folder.name in _HYDRA_GROUPS and not easyedit and not any(isinstance(v, Mapping) for v in data.values()):
    return _flat_file(method, data, where, folder.name)
  if "defaults" in data:  # hydra root: read the named groups from the sibling folders
    out = FileSettings()
    for entry in data.get("defaults") or []:
      if isinstance(entry, Mapping):
        for group, name in entry.items():
          if group in _HYDRA_GROUPS and name:
            sub = folder / group / f"{name}.yaml"
            if not sub.is_file():
              raise UserError(f"{where}: defaults names {group}/{name}, but {sub} does not exist")
            part = _flat_file(method, load_yaml(sub), str(sub), group)
            out.values.update(part.values)
            out.ignored.update(part.ignored)
          else:
            out.ignored[f"defaults.{group}"] = "ignored: not an editor/model/data group"
    rest = {k: v for k, v in data.items() if k != "defaults"}
    part = _nested(method, rest, where)
    out.values.update(part.values)
    out.ignored.update(part.ignored)
    return out
  flat = easyedit or not any(
      isinstance(v, Mapping) for v in data.values())
  return _flat_file(method, data, where) if flat else _nested(method, data, where)


def _nested(method: str, data: Mapping[str, Any], where: str) -> FileSettings:
  """This project's layout (groups as mappings); hydra groups given inline are read like files."""
  out = FileSettings()
  for key, value in data.items():
    key = str(key)
    if key in _HYDRA_GROUPS + ("eval",) and isinstance(value, Mapping):
      part = _flat_file(method, value, where, key)
      out.values.update(part.values)
      out.ignored.update({f"{key}.{k}": r for k, r in part.ignored.items()})
    elif key in RUN_KEYS:
      _run_key(method, key, value, out, where)
    elif key in BY_KEY and method in BY_KEY[key].methods:
      out.values[key] = value
    else:
      raise _unknown(key, method, where)
  return out


def parse_set(text: str) -> tuple[str, Any]:
  """`a.b=value` -> ("a.b", value parsed as YAML: 1e-5, [1, 2], true)."""
  if "=" not in text:
    raise UserError(f"--set {text!r}: expected key=value")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw != "" else ""
  except yaml.YAMLError:
    value = raw
  return key.strip(), value


# ---- resolution ----


@dataclasses.dataclass
class Resolved:
  """A method's effective settings.

  Attributes:
    method: the editing method.
    values: {dotted key: value} of every setting the method reads.
    sources: {dotted key: "default" | "card" | "codebook" | "config" | "set" | "run"}.
    ignored: reference config keys knowingly ignored {key: reason}.
  """

  method: str
  values: dict[str, Any]
  sources: dict[str, str]
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)

  def __getitem__(self, key: str) -> Any:
    return self.values[key]

  def tree(self) -> dict[str, Any]:
    """The nested reference-named tree ({"model": {...}, "data": {...}, "editor": {...}})."""
    return nest(self.values)

  def editor(self) -> dict[str, Any]:
    """The `editor.*` settings without the prefix."""
    return {k.split(".", 1)[1]: v for k, v in self.values.items() if k.startswith("editor.")}

  def given(self, key: str) -> bool:
    """Whether the user chose `key` (a config file or --set), rather than a default or the card."""
    return self.sources.get(key) in ("config", "set")

  def effective(self) -> dict[str, dict[str, Any]]:
    """{key: {"value", "source"}} for metrics.json."""
    return {k: {"value": self.values[k], "source": self.sources[k]} for k in sorted(self.values)}


def card_values(method: str, card: Mapping[str, Any] | None) -> dict[str, Any]:
  """The settings a model card supplies for `method` (a card named "default" supplies none: its
  values are derived from the config, and the derivation is the table's default)."""
  _check_method(method)
  if not card or card.get("name") == "default":
    return {}
  out: dict[str, Any] = {}
  if card.get("dtype"):
    out["model.dtype"] = card["dtype"]
  if method in HYPERNET:
    if card.get("edit_modules"):
      out["model.edit_modules"] = list(card["edit_modules"])
    return out
  horen = card.get("horen") or {}
  if horen.get("layer"):
    out["editor.layer"] = horen["layer"]
  if method == "horen":  # thresholds, strategies and extras are tuned for HoReN only
    if horen.get("threshold") is not None:
      out["editor.hopfield_key_match_threshold"] = horen["threshold"]
    if horen.get("query_strategy"):
      out["editor.query_selection_strategy"] = horen["query_strategy"]
    for key, value in (horen.get("editor") or {}).items():
      out[f"editor.{key}"] = value
  return out


def resolve(method: str, *, card: Mapping[str, Any] | None = None,
            codebook: Mapping[str, Any] | None = None,
            configs: Sequence[str | os.PathLike] | str | os.PathLike | None = (),
            config_tree: Mapping[str, Any] | None = None, config_where: str = "config",
            overrides: Iterable[str] = ()) -> Resolved:
  """default <- card <- codebook <- config files / tree <- --set, with provenance.

  Args:
    method: horse | malmen | mend | horen | grace.
    card: the model card (`horse_jax.models.cards.card_for`), or None.
    codebook: `editor.*` settings of a codebook being continued (names without the prefix).
    configs: --config files, applied in order.
    config_tree: settings given as a mapping (a sweep entry's `settings`), read like a file.
    config_where: what to name in errors about `config_tree`.
    overrides: `key=value` strings (`--set`), applied last.

  Returns:
    The Resolved settings (every key the method reads).

  Raises:
    UserError: an unknown key (naming the closest valid one) or a value of the wrong type.
  """
  _check_method(method)
  values, sources = defaults(method), {k: "default" for k in keys_for(method)}
  ignored: dict[str, str] = {}

  def put(layer: Mapping[str, Any], source: str, where: str) -> None:
    for key, value in layer.items():
      if key not in values:
        raise _unknown(key, method, where)
      values[key] = coerce(key, value, where)
      sources[key] = source

  put(card_values(method, card), "card", f"model card {(card or {}).get('name')}")
  if codebook:
    put({f"editor.{k}": v for k, v in codebook.items() if f"editor.{k}" in values}, "codebook",
        "--codebook settings")
  if isinstance(configs, (str, os.PathLike)):
    configs = [configs]
  for path in configs or ():
    part = read_config(path, method)
    put(part.values, "config", os.fspath(path))
    ignored.update(part.ignored)
  if config_tree:
    part = _nested(method, config_tree, config_where)
    put(part.values, "config", config_where)
    ignored.update(part.ignored)
  for text in overrides:
    key, value = parse_set(text)
    put({key: value}, "set", f"--set {text}")
  return Resolved(method, values, sources, ignored)


def resolve_for_model(method: str, model_path: str | os.PathLike | None, model_config, **kw) -> Resolved:
  """`resolve` with the card of the checkpoint at `model_path` (config: its ModelConfig)."""
  from horse_jax.models.cards import card_for  # noqa: PLC0415  (cards import the model package)
  card = card_for(model_path, model_config) if (model_path or model_config is not None) else None
  return resolve(method, card=card, **kw)
