"""Collectives of a compiled (SPMD-partitioned) XLA program, read from its HLO text.

  summary = collectives(compiled.as_text())
  summary.total_bytes, summary.largest.kind / .shape / .bytes / .count, summary.ops

The compiled HLO of a sharded program is the program one device runs, so every shape in it is per
device. Counted ops: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute (and
ragged-all-to-all, collective-broadcast), in their plain form, their `-start` / `-done` pair, or an
`async-start` / `async-done` pair wrapping one of them; a pair is one op (the `-start` is counted,
the `-done` gives its output shape).

Bytes of one op, per device: the larger of its input and its output buffers, i.e. the whole buffer
the collective works on. That is the buffer for all-reduce / all-to-all / collective-permute, the
gathered output of all-gather and the not yet scattered input of reduce-scatter. (What crosses the
links depends on the algorithm: a ring all-reduce sends and receives 2 (n - 1) / n of it.)

Loops: an op inside a `while` body runs once per iteration; with the trip count XLA recorded
(`known_trip_count` in the while's backend config) it is counted that many times, else once and
the loop is reported in `unknown_trip_loops`. Branches of a `conditional` are all counted (an upper
bound).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "ragged-all-to-all", "collective-broadcast")

# Bits per element of HLO primitive types (sub-byte types rounded up per buffer).
BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
        "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
        "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e3m4": 8,
        "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->\s*.*\{\s*$")
_CALLEES = re.compile(r"\b(condition|body|to_apply|calls|true_computation|false_computation)="
                      r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')


@dataclasses.dataclass(frozen=True)
class Op:
  """One collective of the program (per device).

  Attributes:
    kind: e.g. "all-reduce" (an async pair reports the collective it runs).
    shape: its output type without layouts, e.g. "f32[4096,4096]" or "(f32[8], bf16[16])".
    bytes: the larger of its input and output buffers on one device.
    count: how many times one run of the program executes it (loop trip counts applied).
    name: the instruction's name in the HLO.
  """

  kind: str
  shape: str
  bytes: int
  count: int
  name: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Summary:
  """The collectives of one program.

  Attributes:
    ops: every collective op, in text order.
    total_bytes: sum of bytes x count over the ops (per device, one run of the program).
    largest: the op with the most bytes in one execution (None without collectives).
    unknown_trip_loops: while loops with collectives inside whose trip count XLA did not record
      (their ops are counted once per entry into the loop).
  """

  ops: tuple[Op, ...]
  total_bytes: int
  largest: Op | None
  unknown_trip_loops: int = 0

  def by_kind(self) -> dict[str, int]:
    """Bytes x count summed per kind (per device, one run), largest first."""
    out: dict[str, int] = {}
    for op in self.ops:
      out[op.kind] = out.get(op.kind, 0) + op.bytes * op.count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

  def heaviest(self, n: int = 5) -> list[dict[str, Any]]:
    """The n (kind, shape) groups that move the most bytes in one run, largest first: where a total
    comes from when it is many small ops in loops (e.g. a tensor-parallel LM's per-layer
    all-reduces) rather than one large one.

    Returns:
      [{"kind", "shape", "bytes" (of one execution), "count" (executions of all ops of the
      group), "total_bytes"}].
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for op in self.ops:
      g = groups.setdefault((op.kind, op.shape), {"kind": op.kind, "shape": op.shape, "bytes": op.bytes,
                                                  "count": 0, "total_bytes": 0})
      g["count"] += op.count
      g["total_bytes"] += op.bytes * op.count
    return sorted(groups.values(), key=lambda g: -g["total_bytes"])[:n]

  def to_dict(self) -> dict[str, Any]:
    return {"total_bytes": self.total_bytes, "n_ops": len(self.ops), "by_kind": self.by_kind(),
            "heaviest": self.heaviest(),
            "largest": self.largest.to_dict() if self.largest else None,
            "unknown_trip_loops": self.unknown_trip_loops}


@dataclasses.dataclass
class _Instr:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attrs: str


def type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO type (an array, or a tuple of arrays: summed), e.g. "f32[8,16]{1,0}" -> 512."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype not in BITS:
      continue
    n = 1
    for d in filter(None, (x.strip().lstrip("<=") for x in dims.split(","))):
      n *= int(d)
    total += -(-n * BITS[dtype] // 8)
  return total


def _strip_layouts(hlo_type: str) -> str:
  """"(f32[8,16]{1,0}, s32[])" -> "(f32[8,16], s32[])"."""
  out, depth = [], 0
  for ch in hlo_type:
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
    elif depth == 0:
      out.append(ch)
  return "".join(out)


def _split_type(rest: str) -> tuple[str, str]:
  """("type", "opcode(...) ...") from the text after `name = `."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _parse_instr(line: str) -> _Instr | None:
  m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  hlo_type, tail = _split_type(m.group(2))
  op = re.match(r"([\w\-]+)\((.*)$", tail)
  if not op:
    return None
  depth, end = 1, len(op.group(2))
  for i, ch in enumerate(op.group(2)):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  args, attrs = op.group(2)[:end], op.group(2)[end + 1:]
  operands = re.findall(r"%([\w.\-]+)", args)
  return _Instr(m.group(1), hlo_type, op.group(1), operands, attrs)


def _computations(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    if current is not None:
      instr = _parse_instr(line)
      if instr is not None:
        comps[current].append(instr)
  return comps, entry


def _kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in KINDS else None


def collectives(text: str) -> Summary:
  """The collectives of an HLO module's text (`compiled.as_text()`), see the module docstring."""
  comps, entry = _computations(text)
  if entry is None:  # a module printed without ENTRY: every computation counts once
    counts = {c: 1 for c in comps}
    unknown = 0
  else:
    counts, unknown = _multiplicities(comps, entry)
  ops = []
  for cname, instrs in comps.items():
    times = counts.get(cname, 0)
    if not times:
      continue
    types = {i.name: i.type for i in instrs}
    done_type = {i.operands[0]: i.type for i in instrs if i.opcode.endswith("-done") and i.operands}
    for i in instrs:
      kind = _kind(i.opcode)
      if kind is None and i.opcode == "async-start":
        callee = _CALLEES.search(i.attrs)
        inner = comps.get(callee.group(2), []) if callee else []
        kind = next((_kind(x.opcode) for x in inner if _kind(x.opcode)), None)
      if kind is None:
        continue
      out_type = done_type.get(i.name, i.type) if i.opcode.endswith("-start") else i.type
      in_bytes = sum(type_bytes(types.get(o, "")) for o in i.operands)
      ops.append(Op(kind, _strip_layouts(out_type), max(in_bytes, type_bytes(out_type)), times,
                    i.name))
  largest = max(ops, key=lambda o: o.bytes, default=None)
  return Summary(tuple(ops), sum(o.bytes * o.count for o in ops), largest, unknown)


def _multiplicities(comps: dict[str, list[_Instr]], entry: str) -> tuple[dict[str, int], int]:
  """How many times one run executes each computation (while bodies x known trip counts), and the
  number of loops with collectives and no recorded trip count. Collectives wrapped by an
  `async-start` are counted at the start, so its callee is not visited."""
  counts: dict[str, int] = {}
  unknown = 0

  def has_collective(name: str, seen=()) -> bool:
    if name in seen:
      return False
    for i in comps.get(name, []):
      if _kind(i.opcode) or i.opcode == "async-start":
        return True
      if any(has_collective(c, seen + (name,)) for c in _callees(i)):
        return True
    return False

  def visit(name: str, times: int, depth: int = 0) -> None:
    nonlocal unknown
    if name not in comps or depth > 64:
      return
    counts[name] = counts.get(name, 0) + times
    for i in comps[name]:
      if i.opcode == "async-start" or _kind(i.opcode):
        continue
      for callee in _callees(i):
        factor = 1
        if i.opcode == "while" and callee == _attr(i, "body"):
          trip = _TRIP.search(i.attrs)
          if trip:
            factor = int(trip.group(1))
          elif has_collective(callee):
            unknown += 1
        visit(callee, times * factor, depth + 1)

  visit(entry, 1)
  return counts, unknown


def _attr(instr: _Instr, key: str) -> str | None:
  m = re.search(rf"\b{key}=%?([\w.\-]+)", instr.attrs)
  return m.group(1) if m else None


def _callees(instr: _Instr) -> list[str]:
  out = [m.group(2) for m in _CALLEES.finditer(instr.attrs)]
  for m in _BRANCHES.finditer(instr.attrs):
    out += [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
  return out
