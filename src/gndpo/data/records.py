"""The unit of training data: one prompt with its images and reference answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``images`` are loaded PIL images, in the order they appear in the prompt."""

    id: str
    prompt: str
    answer: str
    images: tuple[Any, ...] = field(default=(), repr=False)
