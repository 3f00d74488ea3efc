"""Greedy benchmark evaluation: the training sampler run greedily, and a per-response reward.

The paper evaluates with temperature 0.6 / top-p 0.95 (arXiv 2606.09091, Table 3); this module is the
deterministic greedy variant, used by ``gndpo eval``, the lab and tests. Generation goes through the same
:class:`~gndpo.rollout.hf.HFRollout` as training, so prompts, EOS handling and suppressed placeholder tokens
are identical.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from gndpo.data.records import PromptRecord
from gndpo.data.templates import PAPER_SUFFIX
from gndpo.rewards.math import format_reward, math_reward
from gndpo.rollout.base import SamplingParams
from gndpo.rollout.hf import HFRollout


@torch.inference_mode()
def greedy_accuracy(
    model,
    processor,
    records: Sequence[PromptRecord],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 1024,
    suffix: str | None = PAPER_SUFFIX,
    system_prompt: str | None = None,
    reward: Callable[[str, str], float] = math_reward,
    progress: bool = True,
) -> dict:
    """Greedy-decode every record and score it with ``reward(response_text, record.answer)``.

    Returns ``accuracy`` (mean reward), ``format_rate`` (``<think>...</think>`` then a ``\\boxed{}``), ``mean_response_length``
    (generated tokens, EOS included), ``truncated_rate`` (no EOS within ``max_new_tokens``), ``n``, and the
    per-item lists ``correct``, ``rewards`` and ``responses`` (generated part only, special tokens skipped).
    ``processor`` may be a multimodal processor or a plain tokenizer.
    """
    sampler = HFRollout(model, processor, suffix=suffix, system_prompt=system_prompt, micro_batch_size=batch_size)
    sampling = SamplingParams(n=1, max_new_tokens=max_new_tokens, greedy=True)
    responses: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        rollouts = sampler.generate(records[start:start + batch_size], sampling)
        responses.extend(rollouts.texts)
        lengths.extend(int(n) for n in rollouts.response_mask.sum(-1))
        truncated.extend(bool(t) for t in rollouts.truncated)
    rewards = [float(reward(text, record.answer)) for text, record in zip(responses, records)]

    n = len(records)
    return {
        "accuracy": sum(rewards) / max(n, 1),
        "format_rate": sum(map(format_reward, responses)) / max(n, 1),
        "mean_response_length": sum(lengths) / max(n, 1),
        "truncated_rate": sum(truncated) / max(n, 1),
        "n": n,
        "correct": [r >= 1.0 for r in rewards],
        "rewards": rewards,
        "responses": responses,
    }
