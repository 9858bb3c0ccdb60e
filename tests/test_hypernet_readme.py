"""The Python snippet of the README's HORSE section runs."""

import pathlib
import re


def test_readme_horse_snippet_runs():
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  section = text[text.index("<!-- section: horse"):text.index("<!-- section: horen")]
  code = re.findall(r"```python\n(.*?)```", section, re.S)
  assert code
  scope: dict = {}
  exec(compile(code[0], "README.md#horse", "exec"), scope)  # noqa: S102
  shifts, edited = scope["shifts"], scope["edited"]
  assert set(shifts) == {"model.layers.1.mlp.down_proj"}
  assert edited is not scope["model"]
