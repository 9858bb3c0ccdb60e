"""The README's models section runs as written (its python blocks, in order, in one namespace)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _models_blocks():
  text = README.read_text()
  start = text.index("<!-- section: models")
  end = text.index("<!-- section:", start + 1)
  return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_models_section_snippets_run(tmp_path, monkeypatch):
  blocks = _models_blocks()
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(README), "exec"), namespace)
  assert namespace["new_tokens"].shape == (2, 8)
  assert namespace["value_grads"].shape == (2, 5, 64)
  assert len(namespace["logits"].sharding.device_set) == 8
