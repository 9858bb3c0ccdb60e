"""The one edit-request type every loader produces and every editor consumes."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EditRecord:
  """One fact to edit, with the prompts that score it.

  Attributes:
    prompt: the edit prompt (ZsRE `src`, CounterFact `prompt`).
    target: the new answer (ZsRE `alt`/`ans`, CounterFact `target_new`); never empty.
    rephrase: a paraphrase of the prompt (generalization), or None.
    loc_prompt: an unrelated prompt (locality), or None.
    loc_answer: its gold answer, or None.
    ground_truth: the pre-edit answer when the data has it.
    portability: optional list of (prompt, answer) pairs.
    extra: any other fields, kept for reports.
  """

  prompt: str
  target: str
  rephrase: str | None = None
  loc_prompt: str | None = None
  loc_answer: str | None = None
  ground_truth: str | None = None
  portability: tuple[tuple[str, str], ...] = ()
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
