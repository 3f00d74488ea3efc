"""Teacher on an in-process vLLM engine: one prefill of prompt + sampled response per sequence with
``prompt_logprobs=0``, which returns exactly each given token's log-prob (temperature 1, full vocabulary).

The prompt is rendered with the teacher's processor and tokenized with one placeholder per image; the images go
raw in ``multi_modal_data`` and vLLM expands them for the teacher's own vision tower (never the student's
expanded ids). The engine reads the teacher's checkpoint (:func:`gndpo.vllm_engine.start_engine_with_weights`). A token the teacher gives zero probability scores ``-inf``, which the reward's clamp
bounds; positions outside the response mask hold 0.
"""
from __future__ import annotations

import torch

from gndpo import vllm_engine as engine
from gndpo.rollout.base import Rollouts


class VLLMTeacher:
    def __init__(self, path: str, processor, *, options: engine.EngineOptions, suffix: str | None,
                 system_prompt: str | None = None, micro_batch_size: int = 64):
        self.processor = processor
        self.suffix, self.system_prompt = suffix, system_prompt
        self.micro_batch_size = micro_batch_size
        self.llm = engine.start_engine_with_weights(path, options)

    def close(self) -> None:
        engine.shutdown(self.llm)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        ids = engine.prompt_ids(self.processor, rollouts.records, suffix=self.suffix, system_prompt=self.system_prompt)
        inputs = [engine.engine_input(i, r.images) for i, r in zip(ids, rollouts.records)]
        out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)  # (B, R)
        lengths = rollouts.response_mask.sum(-1).tolist()
        for start in range(0, rollouts.size, self.micro_batch_size):
            rows = range(start, min(start + self.micro_batch_size, rollouts.size))
            responses = [rollouts.response_ids[b, :int(lengths[b])].tolist() for b in rows]
            scores = engine.score(self.llm, [inputs[int(rollouts.prompt_index[b])] for b in rows], responses)
            for b, row in zip(rows, scores):
                out[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return out
