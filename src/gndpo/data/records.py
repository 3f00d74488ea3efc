"""The unit of training data: one prompt with its images and reference answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``images`` are loaded PIL images, in the order they appear in the prompt.

    ``fields``: the record's text and number fields as the dataset names them (values as strings), which a
    teacher's privileged context (``teacher.context``) and routing (``data.teacher_key``) read. ``system``: text
    added to the system prompt of this record alone (a teacher's privileged context at ``teacher.context_at=
    system``); None for every prompt the student sees."""

    id: str
    prompt: str
    answer: str
    images: tuple[Any, ...] = field(default=(), repr=False)
    fields: dict[str, str] = field(default_factory=dict, repr=False, hash=False)
    system: str | None = None
