"""Teacher on an in-process vLLM engine: one prefill of prompt + sampled response per sequence with
``prompt_logprobs=0``, which returns exactly each given token's log-prob (temperature 1, full vocabulary).

The prompt is rendered with the teacher's processor and tokenized with one placeholder per image; the images go
raw in ``multi_modal_data`` and vLLM expands them for the teacher's own vision tower (never the student's
expanded ids). The engine reads the teacher's checkpoint (:func:`gndpo.vllm_engine.start_engine_with_weights`). A token the teacher gives zero probability scores ``-inf``, which the reward's clamp
bounds; positions outside the response mask hold 0. With ``topk=K`` the same pass returns the teacher's K most
likely tokens at each position (``prompt_logprobs=K``; :func:`gndpo.vllm_engine.score_topk`).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from gndpo import vllm_engine as engine
from gndpo.rollout.base import Rollouts
from gndpo.teacher.base import TeacherScores


class VLLMTeacher:
    def __init__(self, path: str, processor, *, options: engine.EngineOptions, suffix: str | None,
                 system_prompt: str | None = None, micro_batch_size: int = 64, topk: int = 0):
        self.processor = processor
        self.suffix, self.system_prompt = suffix, system_prompt
        self.micro_batch_size = micro_batch_size
        self.topk = topk
        self.llm = engine.start_engine_with_weights(path, replace(options, max_logprobs=max(options.max_logprobs, topk)))

    def close(self) -> None:
        engine.shutdown(self.llm)

    def score(self, rollouts: Rollouts) -> TeacherScores:
        ids = engine.prompt_ids(self.processor, rollouts.records, suffix=self.suffix, system_prompt=self.system_prompt)
        inputs = [engine.engine_input(i, r.images) for i, r in zip(ids, rollouts.records)]
        B, R = rollouts.response_ids.shape
        out = torch.zeros(B, R, dtype=torch.float32)  # (B, R)
        top_ids = torch.zeros(B, R, self.topk, dtype=torch.long) if self.topk else None  # (B, R, K)
        top_lps = torch.zeros(B, R, self.topk, dtype=torch.float32) if self.topk else None  # (B, R, K)
        lengths = rollouts.response_mask.sum(-1).tolist()
        for start in range(0, rollouts.size, self.micro_batch_size):
            rows = range(start, min(start + self.micro_batch_size, rollouts.size))
            responses = [rollouts.response_ids[b, :int(lengths[b])].tolist() for b in rows]
            scores = engine.score_topk(self.llm, [inputs[int(rollouts.prompt_index[b])] for b in rows], responses,
                                       self.topk)
            for b, (row, row_ids, row_lps) in zip(rows, scores):
                out[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
                if self.topk and row:
                    top_ids[b, :len(row)] = torch.tensor(row_ids, dtype=torch.long)
                    top_lps[b, :len(row)] = torch.tensor(row_lps, dtype=torch.float32)
        return TeacherScores(out, top_ids, top_lps)
