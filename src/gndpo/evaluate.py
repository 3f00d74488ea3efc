"""Accuracy on a dataset: the training sampler run greedily or with Table 3's sampling, and a per-response reward.

``gndpo eval MODEL DATA`` is greedy by default (deterministic, used by the lab and tests). With a temperature it
samples K responses per item, as the paper's evaluation does (arXiv 2606.09091, Table 3: temperature 0.6, top-p
0.95), and reports ``mean@K`` (the mean reward over all samples: the expected accuracy of one sample) and
``pass@K`` (the share of items with at least one correct sample among K). Generation goes through the same
samplers as training (the HF loop or vLLM), so prompts, EOS handling and suppressed placeholder tokens are
identical.
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


def pass_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """The share of items with at least one correct sample."""
    return sum(any(c) for c in correct) / max(len(correct), 1)


def mean_at_k(rewards: Sequence[Sequence[float]]) -> float:
    """The mean reward over every sample of every item (items weigh alike: each has K samples)."""
    flat = [r for row in rewards for r in row]
    return sum(flat) / max(len(flat), 1)


@torch.inference_mode()
def sampled_accuracy(sampler, records: Sequence[PromptRecord], sampling: SamplingParams, *, batch_size: int = 64,
                     reward: Callable[[str, str], float] = math_reward, progress: bool = True) -> dict:
    """Generate ``sampling.n`` responses per record with ``sampler`` (a rollout backend) and score each with
    ``reward(response_text, record.answer)``.

    Returns ``accuracy`` (= ``mean@K``), ``mean@K``, ``pass@K``, ``k``, ``format_rate`` (``<think>...</think>``
    then a ``\\boxed{}``), ``mean_response_length`` (generated tokens, EOS included), ``truncated_rate`` (no EOS
    within ``max_new_tokens``), ``n`` (items), and per item ``correct`` (any sample right), ``rewards`` and
    ``responses`` (lists of K; with K = 1 the plain values, special tokens skipped)."""
    k = sampling.n
    responses: list[list[str]] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    # leave=True: the finished bar ends its line, so what is printed next starts a line of its own in a terminal
    # and in a log file alike (a bar erased with a carriage return leaves the next line glued to it in a log)
    bar = tqdm(total=len(records), desc="eval", unit="item", disable=not progress, leave=True)
    for start in range(0, len(records), batch_size):
        rollouts = sampler.generate(records[start:start + batch_size], sampling)
        bar.update(len(records[start:start + batch_size]))
        texts = list(rollouts.texts)
        responses.extend(texts[i * k:(i + 1) * k] for i in range(len(texts) // k))
        lengths.extend(int(n) for n in rollouts.response_mask.sum(-1))
        truncated.extend(bool(t) for t in rollouts.truncated)
    bar.close()
    rewards = [[float(reward(text, record.answer)) for text in texts] for texts, record in zip(responses, records)]
    correct = [[r >= 1.0 for r in row] for row in rewards]
    n, total = len(records), max(len(records) * k, 1)
    one = (lambda rows: [row[0] for row in rows]) if k == 1 else (lambda rows: rows)
    return {
        "accuracy": mean_at_k(rewards), "mean@K": mean_at_k(rewards), "pass@K": pass_at_k(correct), "k": k,
        "format_rate": sum(format_reward(t) for row in responses for t in row) / total,
        "mean_response_length": sum(lengths) / total, "truncated_rate": sum(truncated) / total, "n": n,
        "correct": [any(c) for c in correct], "rewards": one(rewards), "responses": one(responses),
    }


def greedy_accuracy(model, processor, records: Sequence[PromptRecord], *, batch_size: int = 64,
                    max_new_tokens: int = 1024, suffix: str | None = PAPER_SUFFIX, system_prompt: str | None = None,
                    reward: Callable[[str, str], float] = math_reward, progress: bool = True) -> dict:
    """Greedy-decode every record with gndpo's HF sampler and score it (see :func:`sampled_accuracy`; K = 1)."""
    sampler = HFRollout(model, processor, suffix=suffix, system_prompt=system_prompt, micro_batch_size=batch_size)
    return sampled_accuracy(sampler, records, SamplingParams(n=1, max_new_tokens=max_new_tokens, greedy=True),
                            batch_size=batch_size, reward=reward, progress=progress)
