"""Outcome rewards: a scorer per response, looked up by name (``algorithm.outcome_reward``).

A ``Reward`` scores a batch of decoded responses against their reference answers. Register a new one with
``@register_reward("name")`` on a function ``(response, reference) -> float``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

from gndpo.rewards.math import extract_boxed, format_reward, math_format_reward, math_reward, verify_answer

Scorer = Callable[[str, str], float]
_REWARDS: dict[str, Scorer] = {}


@runtime_checkable
class Reward(Protocol):
    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[float]: ...


def register_reward(name: str) -> Callable[[Scorer], Scorer]:
    def register(scorer: Scorer) -> Scorer:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = scorer
        return scorer

    return register


@dataclass(frozen=True)
class _PerResponse:
    """Applies a per-response scorer to a batch."""

    name: str
    scorer: Scorer

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        if len(responses) != len(references):
            raise ValueError(f"reward {self.name!r}: {len(responses)} responses but {len(references)} references")
        return [float(self.scorer(response, reference)) for response, reference in zip(responses, references)]


def get_reward(name: str) -> Reward:
    """The batch reward registered under ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
    return _PerResponse(name, _REWARDS[name])


def available_rewards() -> list[str]:
    return sorted(_REWARDS)


register_reward("math")(math_reward)
register_reward("math_format")(math_format_reward)

__all__ = [
    "Reward",
    "available_rewards",
    "extract_boxed",
    "format_reward",
    "get_reward",
    "math_format_reward",
    "math_reward",
    "register_reward",
    "verify_answer",
]
