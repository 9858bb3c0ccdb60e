"""The import graph of `horse_jax/`, read from the source with `ast`: no cycles, and only the CLI
imports the CLI.

Every import statement counts, including those inside functions: a function-local import still
closes a cycle at run time (it only hides it from module-level tools). `from pkg import name` is an
edge to `pkg.name` when that is a module of the package, else to `pkg`.
"""

from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "horse_jax"
CLI = f"{PACKAGE}.cli"


def module_files(root: str, package: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under `root/package`."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, package)):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = os.path.join(folder, name)
  return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
  """The absolute module a (possibly relative) `from ... import` names."""
  if level == 0:
    return name or ""
  parts = module.split(".")
  base = parts if is_package else parts[:-1]
  base = base[:len(base) - (level - 1)]
  return ".".join(base + ([name] if name else []))


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
  """Modules of `modules` that `source` (the text of `module`) imports anywhere in its body."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(module, is_package, node.level, node.module)
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:  # `import a.b.attr`-style names: the longest module
        target = target.rpartition(".")[0]
      if target and target != module:
        found.add(target)
  return found


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  files = module_files(root, package)
  names = set(files)
  graph = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      graph[module] = imports_of(f.read(), module, path.endswith("__init__.py"), names)
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (as a closed path a -> ... -> a) per strongly connected component that has one."""
  return [_cycle_in(graph, component) for component in tangles(graph)]


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
  """The strongly connected components of more than one module (each module reaches every other)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[set[str]] = []

  def visit(v: str) -> None:  # Tarjan; the graph has a few hundred nodes, recursion is fine
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
  """A shortest closed path from the component's first module back to itself (breadth-first)."""
  start = min(component)
  parents: dict[str, str] = {}
  frontier = [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while path[-1] != start:
            path.append(parents[path[-1]])
          return path[::-1] + [start]
        if w not in parents:
          parents[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle in {component}")  # a strongly connected component has one


def test_cycle_finder_sees_function_local_and_from_imports():
  graph = {
      "p": set(), "p.a": set(), "p.b": set(), "p.c": set(), "p.sub": set(), "p.sub.d": set()}
  sources = {
      "p.a": "import os\nfrom p import b\n",
      "p.b": "def f():\n  from p.c import thing\n",
      "p.c": "from . import a\n",
      "p.sub.d": "from .. import sub\nimport p.sub.d\n",
  }
  for module, text in sources.items():
    graph[module] = imports_of(textwrap.dedent(text), module, False, set(graph))
  assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.c"} and graph["p.c"] == {"p.a"}
  assert graph["p.sub.d"] == {"p.sub"}  # itself is not an edge
  cycles = find_cycles(graph)
  assert cycles == [["p.a", "p.b", "p.c", "p.a"]]
  assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles_in_the_package():
  graph = import_graph()
  lines = [f"{' -> '.join(_cycle_in(graph, c))}   (modules in this loop: {', '.join(sorted(c))})"
           for c in tangles(graph)]
  assert not lines, "import cycles:\n" + "\n".join(lines)


def _outside_scripts(root: str = ROOT) -> list[str]:
  """.py files of the checkout outside the package and the tests (train/, benchmarks/, ...)."""
  skip = {"tests", PACKAGE, "build", "dist", "__pycache__", "node_modules"}
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip
                     and not d.endswith(".egg-info"))
    out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
  return out


def _names_cli(node: ast.AST) -> bool:
  if isinstance(node, ast.Import):
    return any(a.name == CLI or a.name.startswith(CLI + ".") for a in node.names)
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    return (node.module == CLI or node.module.startswith(CLI + ".")
            or (node.module == PACKAGE and any(a.name == "cli" for a in node.names)))
  return False


def test_only_the_cli_imports_the_cli():
  graph = import_graph()
  offenders = sorted(f"{module} imports {target}" for module, targets in graph.items()
                     if not (module == CLI or module.startswith(CLI + "."))
                     for target in targets if target == CLI or target.startswith(CLI + "."))
  for path in _outside_scripts():
    with open(path, encoding="utf-8") as f:
      if any(_names_cli(node) for node in ast.walk(ast.parse(f.read()))):
        offenders.append(f"{os.path.relpath(path, ROOT)} imports {CLI}")
  assert not offenders, "\n".join(offenders)
