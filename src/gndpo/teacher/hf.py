"""In-process teacher: a no-grad forward over prompt + sampled response, with the same images.

The teacher renders and encodes each prompt with its own processor (its image token count may differ
from the student's); the response token ids are the student's, which the compatibility check guarantees
mean the same text to both. With ``topk=K`` it also reports its K most likely tokens at each position, from the
same chunked pass (no full-vocabulary tensor is kept).
"""
from __future__ import annotations

import torch

from gndpo.forward import rollout_stats
from gndpo.rollout.base import Rollouts
from gndpo.teacher.base import TeacherScores


class HFTeacher:
    def __init__(self, model, processor, *, suffix: str | None, system_prompt: str | None = None,
                 micro_batch_size: int = 8, chunk_size: int = 1024, topk: int = 0):
        self.model = model.eval()
        self.processor = processor
        self.suffix = suffix
        self.system_prompt = system_prompt
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size
        self.topk = topk
        for p in self.model.parameters():
            p.requires_grad_(False)

    def close(self) -> None:
        """Nothing to free beyond the model, which goes with this object."""

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's loss (a dense divergence)
    def score(self, rollouts: Rollouts) -> TeacherScores:
        stats = rollout_stats(self.model, self.processor, rollouts, micro_batch_size=self.micro_batch_size,
                              suffix=self.suffix, system_prompt=self.system_prompt, chunk_size=self.chunk_size,
                              topk=self.topk)
        return TeacherScores(stats.logprobs, stats.topk_ids, stats.topk_logprobs)
