"""Running reward statistics for GNDPO at small batches: an extension beyond arXiv 2606.09091.

The paper z-scores the clamped log-ratio with the mean and variance of the current batch alone, and its own
limitations section expects this to "slightly degrade under extremely small batch sizes due to increased
statistical variance". ``algorithm.norm_stats=running`` instead normalizes with the batch's statistics joined
with those of earlier steps, exponentially decayed (decay ``d``, batch moments ``n_t, s_t, q_t`` = token count,
sum, sum of squares of the clamped rewards over every rank's response tokens, float64):

    N_t = d N_{t-1} + n_t        S_t = d S_{t-1} + s_t        Q_t = d Q_{t-1} + q_t        (N_0 = S_0 = Q_0 = 0)
    mean_t = S_t / N_t           var_t = (Q_t - 2 mean_t S_t + N_t mean_t^2) / N_t * N_t / (N_t - 1)

(the batch formula of ``advantages.py`` with the decayed sums in place of the batch's, so the advantage is
``(r - mean_t) * rsqrt(var_t + 1e-8)``). Properties, each tested:
- the first step, and any step with ``d = 0``, is exactly the paper's batch normalization;
- the ratio of decayed sums carries its own bias correction: an exponential moving average started at zero
  needs Adam's ``1 / (1 - d^t)``; here the denominator ``N_t`` is decayed alike, so a stream of identical
  batches gives the batch's own mean and variance at every step (up to the Bessel factor ``N_t / (N_t - 1)``,
  which uses the effective, decayed token count: 1 + O(1/N_t), ~1 at the hundreds of tokens of any real batch);
- ``var_t`` is the variance of every token the decayed window holds, so a drifting batch mean widens it.

Only the batch scope has running statistics: per-group or per-sequence ones have nothing to carry over, since
every step's groups and sequences are new prompts and new samples.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gndpo.core.advantages import Reduce, distillation_signal, masked_moments, moments_mean_var


class Moments(NamedTuple):
    """(sum, sum of squares, token count) of rewards, as :func:`masked_moments` returns them, in float64 python
    floats (decayed sums: ``count`` may be fractional). A plain tuple in checkpoints: ``tuple(m)`` and
    ``Moments(*t)`` round-trip exactly."""

    total: float
    total_sq: float
    count: float

    def mean_std(self) -> tuple[float, float]:
        """The mean and (unbiased) standard deviation the advantages are normalized with; (0, 0) below 2."""
        if self.count < 2:
            return 0.0, 0.0
        mean, var = moments_mean_var(*(torch.tensor(v, dtype=torch.float64) for v in self))
        return float(mean), math.sqrt(float(var))


def reward_moments(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
    reduce: Reduce | None = None,
) -> Moments:
    """The batch moments of the clamped reward (every rank's tokens through ``reduce``), exactly those the
    gndpo estimator computes for its own batch statistics."""
    _, reward = distillation_signal(teacher_logprobs, student_logprobs, response_mask, clamp)  # (B, L)
    s, ss, n = masked_moments(reward, response_mask, reduce)
    return Moments(s.item(), ss.item(), n.item())


def accumulate_moments(previous: Moments | None, batch: Moments, decay: float) -> Moments:
    """``decay * previous + batch`` (``previous`` None: the first step). ``decay`` in [0, 1]."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if previous is None:
        return batch
    return Moments(*(decay * p + b for p, b in zip(previous, batch)))


def norm_metrics(batch: Moments, running: Moments) -> dict[str, float]:
    """The batch's own statistics beside the running ones that normalized the step."""
    batch_mean, batch_std = batch.mean_std()
    running_mean, running_std = running.mean_std()
    return {"norm/batch_mean": batch_mean, "norm/batch_std": batch_std, "norm/running_mean": running_mean,
            "norm/running_std": running_std, "norm/running_count": running.count}


def running_step(
    previous: Moments | None,
    decay: float,
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
    reduce: Reduce | None = None,
) -> tuple[Moments, dict[str, float]]:
    """One step's running statistics (to pass to the estimator as ``moments``, and to keep for the next step)
    and their metrics."""
    batch = reward_moments(teacher_logprobs, student_logprobs, response_mask, clamp, reduce)
    return join_step(previous, decay, batch)


def join_step(previous: Moments | None, decay: float, batch: Moments) -> tuple[Moments, dict[str, float]]:
    """:func:`running_step` from a batch's moments computed elsewhere (the candidate rewards of
    ``algorithm.dense_mode=reward``, ``candidates.candidate_moments``)."""
    running = accumulate_moments(previous, batch, decay)
    return running, norm_metrics(batch, running)
