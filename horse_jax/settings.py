"""Editor settings: resolved from each method's typed dataclass, with provenance.

Each editing method declares its settings once, as a frozen dataclass whose fields carry type,
default and meaning (`horse_jax.editors.hypernet.settings`, `horse_jax.editors.codebook.settings`);
`SETTINGS_CLASSES` maps a method name to it. Everything here is derived from those classes: the dotted
keys (`editor.n_iter`, `model.edit_modules`, `data.batch_size`, ...), their defaults, the typed
coercion of `--set` / YAML values, the `horse-jax settings` table and the unknown-key error.

A run's settings are built in layers, later layers winning, and each effective value remembers the
layer it came from:

  default   the method's settings class
  card      the model card (`models/*.yaml`): edit modules, dtype, the HoReN section (`horen.editor`)
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
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from horse_jax import typed_config
from horse_jax.editors.codebook.settings import GraceSettings, HorenSettings
from horse_jax.editors.defer import DeferSettings
from horse_jax.editors.wise.settings import WiseSettings
from horse_jax.editors.hypernet.settings import HorseSettings, MalmenSettings, MendSettings
from horse_jax.editors.ultraedit.settings import UltraEditSettings
from horse_jax.editors.locate.settings import AlphaEditSettings, MemitSettings, RomeSettings
from horse_jax.errors import UserError
from horse_jax.models.cards import card_for
from horse_jax.typed_config import flatten, module_name  # noqa: F401  (public here too)

# Method name -> its settings class. A new method adds one entry (and its editor module).
SETTINGS_CLASSES: dict[str, type] = {
    "horse": HorseSettings, "malmen": MalmenSettings, "mend": MendSettings,
    "horen": HorenSettings, "grace": GraceSettings, "ultraedit": UltraEditSettings,
    "rome": RomeSettings, "memit": MemitSettings, "alphaedit": AlphaEditSettings,
    "defer": DeferSettings, "wise": WiseSettings,
}
METHODS = tuple(SETTINGS_CLASSES)
# The two families, told apart by their settings classes (MALMEN's and MEND's derive from HORSE's).
HYPERNET = tuple(m for m, c in SETTINGS_CLASSES.items() if issubclass(c, HorseSettings))
CODEBOOK = tuple(m for m, c in SETTINGS_CLASSES.items() if issubclass(c, HorenSettings))
# Training-free weight editors applied batch after batch (UltraEdit).
ULTRAEDIT = tuple(m for m, c in SETTINGS_CLASSES.items() if issubclass(c, UltraEditSettings))
# Locate-then-edit (ROME, MEMIT, AlphaEdit): MEMIT's and AlphaEdit's classes derive from ROME's.
LOCATE = tuple(m for m, c in SETTINGS_CLASSES.items() if issubclass(c, RomeSettings))
# Sequential editors that wrap one module and decide from the whole sequence (DEFER, WISE).
WRAPPED = tuple(m for m in ("defer", "wise") if m in SETTINGS_CLASSES)
SOURCES = ("default", "card", "codebook", "config", "set", "run")


def settings_class(method: str) -> type:
  """The settings dataclass of `method`."""
  _check_method(method)
  return SETTINGS_CLASSES[method]


def _info(method: str) -> dict[str, typed_config.FieldInfo]:
  return typed_config.fields(settings_class(method))


def keys_for(method: str) -> list[str]:
  """The dotted keys `method` reads."""
  return list(_info(method))


def methods_reading(key: str) -> list[str]:
  """The methods that read `key`."""
  return [m for m in METHODS if key in typed_config.fields(SETTINGS_CLASSES[m])]


def all_keys() -> list[str]:
  """Every dotted key some method reads, in declaration order."""
  out: dict[str, None] = {}
  for m in METHODS:
    out.update(dict.fromkeys(keys_for(m)))
  return list(out)


def defaults(method: str) -> dict[str, Any]:
  """{dotted key: default} of every setting `method` reads."""
  return typed_config.to_flat(settings_class(method)())


def default(key: str, method: str = "horen") -> Any:
  """The declared default of `key` for `method`."""
  return defaults(method)[key]


def describe(method: str | None = None) -> str:
  """A markdown table of the settings (of one method, or all)."""
  rows = ["| key | type | default | methods | meaning |", "|---|---|---|---|---|"]
  for key in (keys_for(method) if method else all_keys()):
    readers = methods_reading(key)
    info = _info(method or readers[0])[key]
    kind = info.type_name + (f" ({' / '.join(map(str, info.choices))})" if info.choices else "")
    if method:
      shown, meaning = default(key, method), info.help
    else:
      shown, meaning = (_per_method({m: f(m) for m in readers}) for f in (
          lambda m: default(key, m), lambda m: _info(m)[key].help))
    rows.append(f"| `{key}` | {kind} | {shown} | {', '.join(readers)} | {meaning} |")
  return "\n".join(rows)


def _per_method(values: dict[str, Any]) -> str:
  """One value when every method has it, else `method: value` for each (a key such as
  `editor.batch_size` means what each method's reference calls it)."""
  groups: dict[str, list[str]] = {}
  shown: dict[str, Any] = {}
  for m, v in values.items():
    groups.setdefault(repr(v), []).append(m)
    shown[repr(v)] = v
  if len(groups) == 1:
    return str(next(iter(values.values())))
  return "; ".join(f"{', '.join(ms)}: {shown[r]}" for r, ms in groups.items())


def _check_method(method: str) -> None:
  if method not in SETTINGS_CLASSES:
    raise UserError(f"unknown method {method!r} (one of {', '.join(SETTINGS_CLASSES)})")


# ---- values ----


def coerce(key: str, value: Any, where: str, method: str | None = None) -> Any:
  """`value` checked and converted to the annotated type of `key` (UserError naming `where`)."""
  info = _info(method or methods_reading(key)[0])[key]
  return typed_config.coerce(info, value, where)


def _reads(method: str, key: str) -> bool:
  return key in _info(method)


def _unknown(key: str, method: str, where: str, shown: str | None = None) -> UserError:
  """The error for a key `method` does not read (`shown`: the key as the user wrote it)."""
  close = typed_config.closest(key, keys_for(method))
  if close and shown and "." not in shown:
    close = close.split(".", 1)[1]  # a flat file: suggest the key as it would be written there
  hint = f"; did you mean {close!r}?" if close else ""
  other = methods_reading(key) if key in all_keys() else []
  if other:
    hint = f" (read by {', '.join(other)} only){hint}"
  return UserError(f"{where}: unknown setting {(shown or key)!r} for {method}{hint}")


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


# Keys of the reference config files that are not settings of this project: each is understood
# (mapped or checked) or knowingly ignored, with the reason. EasyEdit (flat HoReN hparams) first.
RUN_KEYS: dict[str, str] = {
    "alg_name": "checked: must name the --method (HOREN, GRACE, MEND, MALMEN, HORSE, ULTRAEDIT, ROME, MEMIT, AlphaEdit, DEFER, WISE)",
    "alg": "ignored: a second spelling of alg_name (UltraEdit files)",
    "model_name": "ignored: the model is --model (its card is found by folder name)",
    "model_class": "ignored: the architecture comes from config.json",
    "tokenizer_class": "ignored: the tokenizer is --model's",
    "tokenizer_name": "ignored: the tokenizer is --model's",
    "no_grad_layers": "ignored: unused by the reference UltraEdit (a MEND leftover)",
    "silent": "ignored: logging verbosity",
    "device": "ignored: JAX places arrays on the available devices (see --mesh)",
    "bf16": "understood: true -> model.dtype bfloat16, false -> float32",
    "fp16": "understood: true -> model.dtype float16",
    "batch_size": "understood: HoReN/GRACE/ROME/MEMIT/AlphaEdit edit one request at a time, so it must be 1; "
                  "UltraEdit: -> editor.batch_size",
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
    "stats_dir": "HoReN/GRACE: ignored (no statistics are read); ROME/MEMIT/AlphaEdit: editor.stats_dir",
    # ROME / MEMIT / AlphaEdit (flat hparams files of the HoReN reference).
    "mom2_dtype": "checked: must be float32 (the statistics accumulate in float32)",
    "mom2_dataset": "ignored: the statistics corpus is --stats-corpus (default: the world's pre-training text)",
    "mom2_adjustment": "MEMIT/AlphaEdit: ignored (their reference always uses C; ROME reads it)",
    "mom2_update_weight": "AlphaEdit: ignored (its reference never reads it; P and L2 take its place)",
    "context_template_length_params": "ignored: the reference samples context templates from the "
                                      "model unseeded; here they are editor.context_templates",
    "layer_selection": "ignored: the reference never reads it (every listed layer is edited)",
    "layer_module_tmp": "ignored: z is added to the residual stream leaving the layer (the decoder layer output)",
    "mlp_module_tmp": "ignored: the MLP output is the last term of its layer's residual stream",
    "attn_module_tmp": "ignored: the reference never reads it",
    "ln_f_module": "ignored: the architecture's final norm",
    "lm_head_module": "ignored: the architecture's LM head",
    "P_loc": "ignored: the projector is recomputed from the cached statistics (editor.stats_dir)",
    "model_class": "ignored: the architecture comes from config.json",
    "tokenizer_class": "ignored: the tokenizer is --model's",
    "tokenizer_name": "ignored: the tokenizer is --model's",
    # HORSE reference (hydra groups and root).
    "name": "editor group: checked against --method; other groups: ignored",
    "name_or_path": "ignored: the model is --model",
    "class_name": "ignored: the architecture comes from config.json",
    "half": "understood: true -> model.dtype bfloat16 (UltraEdit: float16, over bf16, as the "
            "reference's model.half())",
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

_EASYEDIT_ALG = {"horen": "HOREN", "grace": "GRACE", "mend": "MEND", "malmen": "MALMEN", "horse": "HORSE",
                 "ultraedit": "ULTRAEDIT", "rome": "ROME", "memit": "MEMIT", "alphaedit": "ALPHAEDIT",
                 "defer": "DEFER", "wise": "WISE"}
_HYDRA_GROUPS = ("editor", "model", "data")


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
  elif key == "half" and method in ULTRAEDIT:  # the reference calls model.half() after loading
    if value:
      out.values["model.dtype"] = "float16"
    else:
      out.values.setdefault("model.dtype", "float32")
  elif key == "bf16" and method in ULTRAEDIT and out.values.get("model.dtype") == "float16":
    pass  # `half: true` wins, whatever the order of the two keys
  elif key in ("bf16", "half"):
    out.values["model.dtype"] = "bfloat16" if value else "float32"
  elif key == "fp16" and value:
    out.values["model.dtype"] = "float16"
  elif key == "batch_size" and method in ULTRAEDIT:
    out.values["editor.batch_size"] = value
  elif key == "batch_size" and method in CODEBOOK + LOCATE + WRAPPED:
    if int(value) != 1:
      raise UserError(f"{where}: batch_size={value}: {method} edits one request at a time (use 1)")
  elif key == "mom2_dtype":
    if str(value) != "float32":
      raise UserError(f"{where}: mom2_dtype={value!r}: the statistics accumulate in float32 only")
  elif key == "max_length":
    out.values["data.max_length"] = value
  elif key == "inner_params" and method in LOCATE:
    raise UserError(f"{where}: inner_params: {method} edits editor.layers of editor.rewrite_module_tmp")
  elif key == "inner_params":
    mods = [module_name(p) for p in (value if isinstance(value, (list, tuple)) else [value])]
    if method in CODEBOOK + WRAPPED:
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
    full = key if key in all_keys() else prefix + key
    if group == "" and key in _EASYEDIT_RUN_FIRST:
      _run_key(method, key, value, out, where, group)
    elif _reads(method, full):
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
    elif _reads(method, key):
      out.values[key] = value
    else:
      raise _unknown(key, method, where)
  return out


def parse_set(text: str) -> tuple[str, Any]:
  """`a.b=value` -> ("a.b", value parsed as YAML: 1e-5, [1, 2], true). The one `--set` parser."""
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

  @property
  def typed(self):
    """The values as the method's frozen settings dataclass (`SETTINGS_CLASSES[method]`)."""
    return typed_config.from_flat(settings_class(self.method), self.values)

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
  """The settings a model card supplies for `method`: `dtype`, the hypernetworks' `edit_modules`,
  and the section named after the method of the codebook editors and UltraEdit (`horen: {editor:
  {...}}`, `ultraedit: {model: {edit_modules: [...]}, editor: {...}}`, reference names, read like a
  nested --config file); GRACE also wraps the HoReN section's `editor.layer`.
  A card named "default" supplies none: its values are derived from the config, and the derivation
  is the settings class's default."""
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
  where = f"model card {card.get('name')} ({card.get('card_file', 'no file')})"
  layer = ((card.get("horen") or {}).get("editor") or {}).get("layer")
  if layer and method in CODEBOOK:
    out["editor.layer"] = layer
  section = card.get(method) or {}
  if not isinstance(section, Mapping):
    raise UserError(f"{where}: `{method}` must be a mapping of settings ({{editor: {{...}}}})")
  out.update(_nested(method, section, f"{where}: {method}").values)
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
      values[key] = coerce(key, value, where, method)
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
  out = Resolved(method, values, sources, ignored)
  out.typed  # noqa: B018  (cross-field checks of the settings class, before any work starts)
  return out


def resolve_for_model(method: str, model_path: str | os.PathLike | None, model_config, **kw) -> Resolved:
  """`resolve` with the card of the checkpoint at `model_path` (config: its ModelConfig)."""
  card = card_for(model_path, model_config) if (model_path or model_config is not None) else None
  return resolve(method, card=card, **kw)


def resolve_class(cls: type, config_file: str | os.PathLike | None = None,
                  overrides: Iterable[str] = ()) -> Any:
  """An instance of a settings class (e.g. a sweep's): defaults <- YAML file <- each `--set`.

  Raises:
    UserError: an unknown key (naming the closest valid one) or a value of the wrong type.
  """
  info = typed_config.fields(cls)
  values: dict[str, Any] = {}

  def put(layer: Mapping[str, Any], where: str) -> None:
    for key, value in layer.items():
      if key not in info:
        close = typed_config.closest(key, list(info))
        hint = f"; did you mean {close!r}?" if close else ""
        raise UserError(f"{where}: unknown setting {key!r}{hint}")
      values[key] = typed_config.coerce(info[key], value, where)

  if config_file:
    put(flatten(load_yaml(config_file)), os.fspath(config_file))
  for text in overrides:
    key, value = parse_set(text)
    put(flatten({key: value}) if isinstance(value, Mapping) else {key: value}, f"--set {text}")
  return typed_config.from_flat(cls, values)
