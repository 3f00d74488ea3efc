"""Self-distillation (``teacher.path=self``, ``teacher.self_weights=current``): the student's own live weights are
the teacher, given a privileged context the student does not see (:class:`gndpo.teacher.context.ContextTeacher`
wraps this one), as on-policy self-distillation does (OPSD, SDPO).

It scores through the trainer's :class:`gndpo.forward.ResponseScorer`, without gradient and in eval mode: the same
weights, compute dtype (autocast in one process) and scoring paths as the student's own passes, and no second copy
of the weights. Under torchrun (FSDP2) the scorer's units are gathered once for the whole call (``context``), as
the hf sampler does, so the ranks need not run the same number of forward passes; entering that context is a
collective, so every rank calls :meth:`score` even with no response of its own to score (``collective``).
``self_weights=initial`` needs none of this: it is an :class:`gndpo.teacher.hf.HFTeacher` over a frozen copy of
``model.path``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from gndpo.forward import rollout_stats
from gndpo.rollout.base import Rollouts
from gndpo.teacher.base import TeacherScores


class StudentTeacher:
    def __init__(self, scorer, processor, *, suffix: str | None, system_prompt: str | None = None,
                 micro_batch_size: int = 8, topk: int = 0,
                 context: Callable[[], ContextManager] | None = None, collective: bool = False):
        self.scorer, self.processor = scorer, processor
        self.suffix, self.system_prompt = suffix, system_prompt
        self.micro_batch_size, self.topk = micro_batch_size, topk
        self.context = context or contextlib.nullcontext
        self.collective = collective

    def close(self) -> None:
        """Nothing to free: the weights are the student's."""

    def score(self, rollouts: Rollouts) -> TeacherScores:
        was_training = self.scorer.training
        self.scorer.eval()  # the teacher has no dropout; the update sets train() again
        try:
            with torch.no_grad(), self.context():  # not inference_mode: the scores may enter the student's loss
                stats = rollout_stats(self.scorer, self.processor, rollouts, micro_batch_size=self.micro_batch_size,
                                      suffix=self.suffix, system_prompt=self.system_prompt, topk=self.topk)
        finally:
            self.scorer.train(was_training)
        return TeacherScores(stats.logprobs, stats.topk_ids, stats.topk_logprobs)
