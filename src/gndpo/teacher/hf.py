"""In-process teacher: a no-grad forward over prompt + sampled response, with the same images.

The teacher renders and encodes each prompt with its own processor (its image token count may differ
from the student's); the response token ids are the student's, which the compatibility check guarantees
mean the same text to both.
"""
from __future__ import annotations

import torch

from gndpo.forward import rollout_logprobs
from gndpo.rollout.base import Rollouts


class HFTeacher:
    def __init__(self, model, processor, *, suffix: str | None, system_prompt: str | None = None,
                 micro_batch_size: int = 8, chunk_size: int = 1024):
        self.model = model.eval()
        self.processor = processor
        self.suffix = suffix
        self.system_prompt = system_prompt
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    def close(self) -> None:
        """Nothing to free beyond the model, which goes with this object."""

    @torch.inference_mode()
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return rollout_logprobs(self.model, self.processor, rollouts, micro_batch_size=self.micro_batch_size,
                                suffix=self.suffix, system_prompt=self.system_prompt, chunk_size=self.chunk_size)
