"""What a micro-batch's loss is, and the per-token signal a dense (top-k) distillation step is built on.

- The paper's methods (and ``algorithm.dense_mode=reward``): a clipped policy loss (``core/losses``) on the
  step's advantages.
- ``algorithm.distill=topk`` with ``dense_mode=loss``: the top-k divergence itself (``core/divergences``) between
  the teacher's distribution and the student's, a supervised per-token loss on the student's logits aggregated
  with ``loss_agg_mode`` (GKD-style, on the student's own samples).
- ``dense_mode=reward``: a policy gradient over every candidate of a position (the teacher's top-k and the tail,
  ``core/candidates``): each gets the reward ``-dD_t/dq(c)`` under the pre-update student, clamped and normalized
  by the method (gndpo: over the whole batch, moments taken as expectations under the old student), and the loss
  is the clipped surrogate in expectation over the candidates (:class:`CandidateAdvantages`). The per-token
  advantage a step reports (StepRecord, the inspector, ``adv_*`` metrics, the guards) is the sampled token's
  candidate's (:func:`token_advantages`).

The student's distribution is at the rollout temperature, as its log-probs of the sampled tokens are everywhere in
gndpo; the teacher's at temperature 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gndpo.config import RunConfig
from gndpo.core.advantages import Reduce
from gndpo.core.candidates import (
    candidate_advantages, candidate_moments, candidate_policy_loss, candidate_rewards, sampled_candidate,
)
from gndpo.core.normstats import Moments, join_step
from gndpo.core.divergences import buckets, topk_divergence
from gndpo.core.logprobs import TokenStats
from gndpo.core.losses import aggregate_loss, compute_policy_loss
from gndpo.forward import micro_batch_inputs, response_stats
from gndpo.rollout.base import Rollouts
from gndpo.teacher.base import TeacherScores


def dense_loss(cfg: RunConfig) -> bool:
    """Whether the update minimizes the top-k divergence directly (no policy gradient, no advantages)."""
    return cfg.algorithm.distill == "topk" and cfg.algorithm.dense_mode == "loss"


def dense_reward(cfg: RunConfig) -> bool:
    return cfg.algorithm.distill == "topk" and cfg.algorithm.dense_mode == "reward"


@dataclass(frozen=True)
class CandidateAdvantages:
    """``dense_mode=reward``: the advantages of every candidate (B, R, K + 1), the pre-update student's log-probs of
    the candidates (B, R, K + 1), and the sampled token's candidate (B, R). Indexed, multiplied by a (B, R) mask
    and ``abs()``-ed as the (B, R) advantages of the other modes are, over rows and positions."""

    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    sampled: torch.Tensor

    def __getitem__(self, index) -> "CandidateAdvantages":
        return CandidateAdvantages(self.advantages[index], self.old_logprobs[index], self.sampled[index])

    def __mul__(self, mask: torch.Tensor) -> "CandidateAdvantages":
        return CandidateAdvantages(self.advantages * mask[..., None], self.old_logprobs, self.sampled)

    def abs(self) -> torch.Tensor:
        """The largest |A_t(c)| of each position (B, R)."""
        return self.advantages.abs().amax(-1)


def token_advantages(advantages: torch.Tensor | CandidateAdvantages) -> torch.Tensor:
    """The per-token advantages (B, R) a step reports: as they are, or the sampled token's candidate's (NaN where
    any candidate's is not finite, so the guards see it)."""
    if not isinstance(advantages, CandidateAdvantages):
        return advantages
    chosen = advantages.advantages.gather(-1, advantages.sampled.long().unsqueeze(-1)).squeeze(-1)  # (B, R)
    return torch.where(torch.isfinite(advantages.advantages).all(-1), chosen, torch.nan)


def candidate_step(cfg: RunConfig, response_ids: torch.Tensor, mask: torch.Tensor, teacher: TeacherScores,
                   old_stats: TokenStats, reduce: Reduce | None, norm: Moments | None, group_ids: torch.Tensor
                   ) -> tuple[CandidateAdvantages, dict[str, float], Moments | None]:
    """``dense_mode=reward``'s advantages from the teacher's top-k and the pre-update student's log-probs of them,
    their metrics, and the running statistics after this step (``norm``: before it; None unless
    ``algorithm.norm_stats=running``)."""
    a = cfg.algorithm
    rewards, old = candidate_rewards(a.divergence, teacher_topk_logprobs=teacher.topk_logprobs,
                                     student_topk_logprobs=old_stats.gathered, student_rest=old_stats.rest,
                                     beta=a.jsd_beta)  # (B, R, K + 1) each
    norm_metrics = {}
    if a.norm_stats == "running":
        batch = Moments(*(float(v) for v in candidate_moments(rewards, old, mask, a.reward_clamp, reduce)))
        norm, norm_metrics = join_step(norm, a.norm_decay, batch)
    sampled = sampled_candidate(response_ids, teacher.topk_ids)  # (B, R)
    scope, names = "teacher" if a.teacher_norm == "per_teacher" else a.scope, tuple(t.name for t in cfg.teachers)
    adv, metrics = candidate_advantages(rewards, old, mask, sampled, clamp=a.reward_clamp, scope=scope,
                                        group_ids=group_ids, reduce=reduce, moments=norm,
                                        teacher_ids=teacher.teacher_ids, teacher_names=names)
    return CandidateAdvantages(adv, old.float(), sampled), {**metrics, **norm_metrics}, norm


def divergence(cfg: RunConfig, teacher_topk_logprobs: torch.Tensor, student: TokenStats
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(divergence, teacher tail mass, student tail mass) at every position ``(B, R)``, ``student`` holding the
    student's log-probs of the teacher's top-k ids and its rest."""
    a = cfg.algorithm
    return topk_divergence(a.divergence, teacher_topk_logprobs=teacher_topk_logprobs,
                           student_topk_logprobs=student.gathered, student_rest=student.rest, beta=a.jsd_beta)


def divergence_metrics(values: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mask: torch.Tensor,
                       ) -> dict[str, tuple[float, float]]:
    """``distill/*`` as (sum, token count) pairs, ready for :meth:`gndpo.dist.DistContext.pool`."""
    m = mask.to(values[0].device).bool()
    n = float(m.sum())
    names = ("distill/divergence", "distill/teacher_tail", "distill/student_tail")
    return {name: (float(torch.where(m, v.detach(), 0.0).sum()), n) for name, v in zip(names, values)}


def micro_batch_loss(cfg: RunConfig, model, encoded: Sequence[dict], part: Rollouts, *, old_lp: torch.Tensor | None,
                     advantages: torch.Tensor | CandidateAdvantages, teacher: TeacherScores | None,
                     totals: torch.Tensor, pad_id: int,
                     with_entropy: bool) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """The loss of the responses ``part`` (one micro-batch; ``teacher``, ``old_lp`` and ``advantages`` already cut
    to it), with the whole mini-batch's denominators ``totals`` (tokens, sequences; all ranks), its metrics and
    the student's token entropies (or None)."""
    a, device = cfg.algorithm, next(model.parameters()).device
    R = part.response_ids.shape[1]
    mask = part.response_mask.to(device)
    inputs, rows = micro_batch_inputs(model, encoded, part.prompt_index, pad_id=pad_id, device=device)
    gather = teacher.topk_ids[:, :R].to(device) if dense_loss(cfg) or dense_reward(cfg) else None
    stats = response_stats(model, inputs, part.response_ids.to(device), mask, prompt_index=rows,
                           temperature=cfg.rollout.temperature, with_entropy=with_entropy, gather=gather)
    agg = dict(total_tokens=float(totals[0]), total_seqs=float(totals[1]), norm_length=cfg.rollout.max_new_tokens)
    if isinstance(advantages, CandidateAdvantages):  # dense_mode=reward: every candidate's clipped surrogate
        loss, metrics = candidate_policy_loss(
            old_logprobs=advantages.old_logprobs.to(device), logprobs=buckets(stats.gathered, stats.rest),
            advantages=advantages.advantages.to(device), response_mask=mask, clip_low=a.clip_low,
            clip_high=a.clip_high, agg_mode=a.loss_agg_mode, **agg)
        return loss, metrics, stats.entropy
    if gather is not None:
        values = divergence(cfg, teacher.topk_logprobs[:, :R].to(device), stats)
        loss = aggregate_loss(values[0], mask, a.loss_agg_mode, **agg)
        metrics = {k: s / n if n else 0.0 for k, (s, n) in divergence_metrics(values, mask).items()}
        return loss, metrics, stats.entropy
    old = stats.logprobs.detach() if old_lp is None else old_lp.to(device)
    loss, metrics = compute_policy_loss(
        a.policy_loss, old_logprobs=old, logprobs=stats.logprobs, advantages=advantages.to(device),
        response_mask=mask, clip_low=a.clip_low, clip_high=a.clip_high, agg_mode=a.loss_agg_mode, **agg)
    return loss, metrics, stats.entropy
