"""Module structure: no import cycles inside `editors/hypernet` (function-local imports included), and
importing horse_jax sets no environment variable."""

import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = "horse_jax.editors.hypernet"
ROOT = pathlib.Path(__file__).parents[1]
FOLDER = ROOT / "horse_jax" / "editors" / "hypernet"


def imported_modules(path: pathlib.Path) -> set[str]:
  """Modules of PACKAGE that `path` imports anywhere in its body (functions included)."""
  mods = {p.stem for p in FOLDER.glob("*.py")}
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith(PACKAGE + "."):
        head = name[len(PACKAGE) + 1:].split(".")[0]
        if head in mods:
          out.add(head)
  return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a list of nodes (first == last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(n):
    state[n] = 1
    path.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return path[path.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    state[n] = 2
    path.pop()
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_hypernet():
  graph = {p.stem: imported_modules(p) - {p.stem} for p in FOLDER.glob("*.py") if p.stem != "__init__"}
  assert graph["editor"] >= {"program", "memo"} and "editor" not in graph["program"] | graph["memo"]
  assert find_cycle(graph) is None, find_cycle(graph)


def test_importing_horse_jax_sets_no_environment_variable():
  """Every module of horse_jax imported in a fresh process leaves os.environ as JAX left it."""
  code = """
import os, pkgutil, importlib, json
import jax, jax.numpy, numpy, optax, flax  # these set their own variables (TF_CPP_MIN_LOG_LEVEL...)
before = dict(os.environ)
import horse_jax
names = [m.name for m in pkgutil.walk_packages(horse_jax.__path__, "horse_jax.")
         if not m.name.endswith("__main__")]
for name in names:
  importlib.import_module(name)
after = dict(os.environ)
print(json.dumps({"n": len(names), "changed": sorted(k for k in set(before) | set(after)
                                                     if before.get(k) != after.get(k))}))
"""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, check=True).stdout
  import json
  result = json.loads(out.strip().splitlines()[-1])
  assert result["n"] > 20 and result["changed"] == [], result
