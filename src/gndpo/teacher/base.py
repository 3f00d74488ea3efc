"""The teacher protocol: score the student's sampled tokens."""
from __future__ import annotations

from typing import Protocol

import torch

from gndpo.rollout.base import Rollouts


class Teacher(Protocol):
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """Teacher log-probs ``(B, R)`` of ``rollouts.response_ids``, 0 outside ``response_mask``."""
        ...

    def close(self) -> None:
        """Free what the teacher holds (an engine, connections) at the end of a run."""
        ...
