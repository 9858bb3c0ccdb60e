"""The README's HoReN, evaluation, world and NNX snippets run as written (models/hypernet: own tests)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(section: str) -> list[str]:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index(f"<!-- section: {section}")
  end = text.find("<!-- section:", start + 1)
  end = text.index("## Performance") if end < 0 else end
  return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.parametrize("section", ["horen", "eval", "world", "nnx"])
def test_section_snippets_run(section, tmp_path, monkeypatch):
  blocks = _blocks(section)
  assert blocks, section
  # Relative paths in the snippets: shipped files resolve from the repo root, outputs go to tmp.
  monkeypatch.chdir(tmp_path)
  os.symlink(os.path.join(ROOT, "checkpoints"), tmp_path / "checkpoints")
  namespace: dict = {}
  for code in blocks:
    exec(compile(code, f"README:{section}", "exec"), namespace)  # noqa: S102
