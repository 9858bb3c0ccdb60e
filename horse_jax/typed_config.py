"""Frozen, typed settings dataclasses: declare a field once, derive everything else from it.

A settings class is a frozen dataclass whose fields are declared with `setting(default, help)`; the
field's annotation is its type (`int`, `float`, `bool`, `str`, a `Literal[...]` of choices, `X | None`
when None is allowed, `tuple[str, ...]` for module lists). Fields whose type is itself a settings
dataclass are groups (`model`, `data`, `editor`, `eval`), so a method's settings are one tree with
dotted keys such as `editor.n_iter`. From the class alone this module derives the dotted keys, their
defaults, the coercion of a YAML / `--set` value by annotation, the validation of choices and bounds
(`Settings.__post_init__`) and the closest valid key of a typo. The groups every method reads
(`ModelSettings`, `DataSettings`) are declared here too.

This module knows no editor: editors declare their classes with it, `horse_jax.settings` resolves them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Callable, Literal, Mapping

from horse_jax.errors import UserError


def setting(default: Any, help: str, *, minimum: float | None = None,  # noqa: A002  (dataclass "help")
            parse: Callable[[Any], Any] | None = None) -> Any:
  """A settings field: its default and one-line meaning (shown by `horse-jax settings`).

  Args:
    default: the value (for a group: a default instance of the group's class).
    help: one line for humans.
    minimum: the smallest valid value of a number.
    parse: normalizes a valid string value (e.g. a reference parameter path -> module name).

  Returns:
    A `dataclasses.field`.
  """
  meta = {"help": help, "minimum": minimum, "parse": parse}
  return dataclasses.field(default=default, metadata=meta)


def new_default(cls: type, name: str, default: Any) -> Any:
  """Field `name` of settings class `cls` with another default, for a subclass (a method whose
  defaults differ): the type and meaning stay declared once, on `cls`."""
  base = next(f for f in dataclasses.fields(cls) if f.name == name)
  return dataclasses.field(default=default, metadata=base.metadata)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
  """One leaf setting of a class, by dotted key.

  Attributes:
    key: e.g. "editor.n_iter".
    type: the resolved annotation.
    default: the class's default value.
    help: the one-line meaning.
    minimum: the smallest valid number, or None.
    parse: the string normalizer, or None.
  """

  key: str
  type: Any
  default: Any
  help: str
  minimum: float | None = None
  parse: Callable[[Any], Any] | None = None

  @property
  def optional(self) -> bool:
    """Whether None is a valid value."""
    return _is_optional(self.type)

  @property
  def choices(self) -> tuple[Any, ...]:
    """The allowed values of a Literal type (empty = any value of the type)."""
    base = _strip_none(self.type)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()

  @property
  def type_name(self) -> str:
    """"int", "float", "str", "bool", "modules" or "str" with choices."""
    base = _strip_none(self.type)
    if typing.get_origin(base) is Literal:
      return "str"
    if typing.get_origin(base) is tuple:
      item = typing.get_args(base)[0]
      return f"list of {getattr(item, '__name__', 'any')}"
    return getattr(base, "__name__", str(base))


def is_group(tp: Any) -> bool:
  """Whether a resolved annotation is a nested settings dataclass."""
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_optional(tp: Any) -> bool:
  return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
  if _is_optional(tp):
    rest = [a for a in typing.get_args(tp) if a is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
  return tp


@functools.lru_cache(maxsize=None)
def fields(cls: type) -> dict[str, FieldInfo]:
  """{dotted key: FieldInfo} of every leaf setting of `cls`, groups expanded, in declaration order."""
  hints = typing.get_type_hints(cls)
  out: dict[str, FieldInfo] = {}
  for f in dataclasses.fields(cls):
    if not f.init:
      continue
    tp = hints[f.name]
    if is_group(tp):
      group_cls = type(f.default) if dataclasses.is_dataclass(f.default) else tp
      out.update({f"{f.name}.{k}": dataclasses.replace(v, key=f"{f.name}.{k}")
                  for k, v in fields(group_cls).items()})
    elif "help" in f.metadata:
      out[f.name] = FieldInfo(f.name, tp, f.default, f.metadata["help"], f.metadata.get("minimum"),
                              f.metadata.get("parse"))
  return out


def to_flat(obj: Any) -> dict[str, Any]:
  """{dotted key: value} of a settings instance (groups expanded)."""
  out: dict[str, Any] = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      out.update({f"{f.name}.{k}": v for k, v in to_flat(value).items()})
    elif "help" in f.metadata:
      out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


def from_flat(cls: type, values: Mapping[str, Any], base: Any = None) -> Any:
  """An instance of `cls` from {dotted key: value} (missing keys keep `base`'s, else the defaults).

  Raises:
    UserError: an unknown key, or a value its field's validation refuses.
  """
  base = cls() if base is None else base
  grouped: dict[str, dict[str, Any]] = {}
  own: dict[str, Any] = {}
  for key, value in values.items():
    head, _, rest = key.partition(".")
    if rest:
      grouped.setdefault(head, {})[rest] = value
    else:
      own[key] = value
  for head, sub in grouped.items():
    group = getattr(base, head, None)
    if not dataclasses.is_dataclass(group):
      raise UserError(f"settings: {head!r} is not a group of {cls.__name__}")
    own[head] = from_flat(type(group), sub, group)
  try:
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in own.items()})
  except TypeError as err:
    raise UserError(f"settings: {err}") from None


class Settings:
  """Mixin of settings dataclasses: checks choices and bounds of every own leaf field on creation."""

  def __post_init__(self):
    for key, info in fields(type(self)).items():
      if "." not in key:
        check(info, getattr(self, key), type(self).__name__)


def check(info: FieldInfo, value: Any, where: str) -> None:
  """Raises UserError when `value` is outside `info`'s choices or bounds (type is `coerce`'s job)."""
  if value is None:
    if not info.optional:
      raise UserError(f"{where}: {info.key} must not be empty")
    return
  if isinstance(value, (list, tuple)):
    for item in value:
      check(info, item, where)
    return
  if info.choices and value not in info.choices:
    allowed = ", ".join(map(str, info.choices))
    raise UserError(f"{where}: {info.key}={value!r}: expected one of {allowed}")
  if info.minimum is not None and value < info.minimum:
    raise UserError(f"{where}: {info.key}={value!r} must be >= {info.minimum:g}")


def coerce(info: FieldInfo, value: Any, where: str) -> Any:
  """`value` (from YAML or `--set`) converted to `info`'s annotated type and checked.

  Raises:
    UserError: naming `where`, the key and the expected type.
  """
  if value is None:
    check(info, None, where)
    return None
  base = _strip_none(info.type)
  bad = UserError(f"{where}: {info.key}={value!r} is not a valid {info.type_name}")
  if base is bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    if not isinstance(value, bool):
      raise bad
  elif base is int:
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad
  elif base is float:
    if isinstance(value, bool):
      raise bad
    try:
      value = float(value)  # YAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
      raise bad from None
  elif typing.get_origin(base) is tuple:  # tuple[X, ...]: a YAML list (one item may be written bare)
    item = typing.get_args(base)[0]
    if not isinstance(value, (list, tuple)):
      value = [value]
    if not value:
      raise bad
    if item is not Any:
      value = [coerce(dataclasses.replace(info, type=item), v, where) for v in value]
  else:  # str or a Literal of strings
    if not isinstance(value, str):
      raise bad
    value = info.parse(value) if info.parse else value
  check(info, value, where)
  return value


def closest(key: str, valid: list[str]) -> str | None:
  """The valid key a typo most likely meant: a short form of a longer name (`alpha` for
  `hopfield_retrieval_alpha`) first, then spelling distance of the whole key, then of its last part."""
  last = key.split(".")[-1]
  suffix = [k for k in valid if len(last) >= 3 and k.split(".")[-1].endswith("_" + last)]
  if suffix:
    return suffix[0]
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if close:
    return close[0]
  short = {k.split(".")[-1]: k for k in valid}
  close = difflib.get_close_matches(last, list(short), n=1, cutoff=0.5)
  return short[close[0]] if close else None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{a: {b: 1}} -> {"a.b": 1}; stops at non-mapping values."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def module_name(param: str) -> str:
  """A module name from a reference parameter path: `model.layers[29].mlp.down_proj.weight` ->
  `model.layers.29.mlp.down_proj` (EasyEdit writes list indices in brackets)."""
  name = re.sub(r"\[(\d+)\]", r".\1", str(param).strip())
  for suffix in (".weight", ".bias", ".kernel"):
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  return name


# ---- groups every editing method reads ----


@dataclasses.dataclass(frozen=True)
class ModelSettings(Settings):
  """`model.*` of every method."""

  dtype: Literal["float32", "bfloat16", "float16"] | None = setting(
      None, "LM compute dtype; None = the model card's, else float32 (editor solves stay float32)")


@dataclasses.dataclass(frozen=True)
class DataSettings(Settings):
  """`data.*` of every method."""

  max_length: int | None = setting(
      None, "longest tokenized edit; None = the model's max_position_embeddings", minimum=1)
