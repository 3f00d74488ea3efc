"""The teacher protocol: score the student's sampled tokens, and optionally report its own top-k at each position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gndpo.rollout.base import Rollouts


@dataclass(frozen=True)
class TeacherScores:
    """What a teacher says about a batch of responses; one type for every backend and the server's wire format.

    ``logprobs`` (B, R) float32: the teacher's log-prob of each sampled token (``-inf`` kept: a token it rules
    out). ``topk_ids`` / ``topk_logprobs`` (B, R, K): its K most likely tokens at each response position and their
    log-probs, descending, when the teacher was built with ``topk=K > 0`` (else None). All 0 outside
    ``response_mask``. ``teacher_ids`` (B,) long: which of several teachers (a
    :class:`gndpo.teacher.composite.RoutedTeacher`'s, in its order) scored each response; None for one teacher.
    It stays on this side of the wire: a served teacher is one teacher."""

    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    teacher_ids: torch.Tensor | None = None

    @property
    def topk(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[-1])

    def select(self, index) -> "TeacherScores":
        """The scores of responses ``index`` (as :meth:`gndpo.rollout.base.Rollouts.select`)."""
        return TeacherScores(*(None if x is None else x[index] for x in (self.logprobs, self.topk_ids,
                                                                          self.topk_logprobs, self.teacher_ids)))


class Teacher(Protocol):
    topk: int  # K of the top-k each score reports (0: the sampled tokens' log-probs only)

    def score(self, rollouts: Rollouts) -> TeacherScores:
        """The teacher's :class:`TeacherScores` of ``rollouts.response_ids``."""
        ...

    def close(self) -> None:
        """Free what the teacher holds (an engine, connections) at the end of a run."""
        ...
