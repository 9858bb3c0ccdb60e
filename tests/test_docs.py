"""Every code block of README.md and docs/*.md runs as written.

Python blocks of one page run in order in one namespace; bash blocks run in bash with `horse-jax`
bound to this checkout's CLI. A block preceded by `<!-- parse-only: REASON -->` (a run that needs real
weights, an accelerator or many minutes) is not run: each `horse-jax` command in it must parse with
the CLI's own argument parser, so a renamed or removed option still fails here. Every page runs in a
fresh folder where `checkpoints/`, `train/`, `eval/` and `models/` point at the repository's, so
relative paths resolve as they do in a checkout and outputs stay out of it.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- parse-only: (?P<why>[^>]*?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```",
                   re.S)


def _blocks(page: pathlib.Path, lang: str) -> list[tuple[str | None, str]]:
  return [(m["why"], m["code"]) for m in BLOCK.finditer(page.read_text(encoding="utf-8"))
          if m["lang"] == lang]


def _workdir(tmp_path: pathlib.Path) -> pathlib.Path:
  for name in ("checkpoints", "train", "eval", "models"):
    os.symlink(ROOT / name, tmp_path / name)
  return tmp_path


def _commands(code: str) -> list[list[str]]:
  """The `horse-jax ...` command lines of a bash block (continuations joined, comments cut)."""
  out = []
  for line in code.replace("\\\n", " ").splitlines():
    for part in re.split(r"&&|;", line.split(" #")[0]):
      words = shlex.split(part.strip()) if part.strip() else []
      if words and words[0].endswith("horse-jax"):
        out.append(words[1:])
  return out


def test_every_page_has_runnable_blocks():
  assert (ROOT / "docs").is_dir(), "docs/ is part of the repository"
  for page in PAGES:
    assert page.read_text(encoding="utf-8").count("```") % 2 == 0, f"{page.name}: unclosed fence"
  assert sum(len(_blocks(p, "python")) for p in PAGES) >= 8


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(_workdir(tmp_path))
  # A real module object: dataclasses defined in a snippet look their module up in sys.modules.
  module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
  monkeypatch.setitem(sys.modules, module.__name__, module)
  for why, code in _blocks(page, "python"):
    assert why is None, f"{page.name}: python blocks always run"
    exec(compile(code.replace("/tmp/", f"{tmp_path}/"), str(page), "exec"), module.__dict__)  # noqa: S102


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "bash")], ids=lambda p: p.name)
def test_bash_blocks_run_or_parse(page, tmp_path):
  from horse_jax.cli.main import build_parser  # the CLI's own parser checks parse-only blocks
  parser = build_parser()
  workdir = _workdir(tmp_path)
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  prelude = f'set -euo pipefail\nhorse-jax() {{ {shlex.quote(sys.executable)} -m horse_jax.cli.main "$@"; }}\n'
  for why, code in _blocks(page, "bash"):
    if why is not None:
      assert why.strip(), f"{page.name}: a parse-only block says why"
      for argv in _commands(code):
        parser.parse_args(argv)  # SystemExit (a failure) on an unknown option or command
      continue
    proc = subprocess.run(["bash", "-c", prelude + code.replace("/tmp/", f"{tmp_path}/")], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{page.name}:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
