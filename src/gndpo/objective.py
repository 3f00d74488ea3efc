"""What a micro-batch's loss is, and the per-token signal a dense (top-k) distillation step is built on.

- The paper's methods (and ``algorithm.dense_mode=reward``): a clipped policy loss (``core/losses``) on the
  step's advantages.
- ``algorithm.distill=topk`` with ``dense_mode=loss``: the top-k divergence itself (``core/divergences``) between
  the teacher's distribution and the student's, a supervised per-token loss on the student's logits aggregated
  with ``loss_agg_mode`` (GKD-style, on the student's own samples).
- ``dense_mode=reward``: the negative divergence under the pre-update student is the per-token reward, which the
  method's estimator clamps and normalizes (gndpo: over the whole batch) into the policy loss's advantages.

The student's distribution is at the rollout temperature, as its log-probs of the sampled tokens are everywhere in
gndpo; the teacher's at temperature 1.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gndpo.config import RunConfig
from gndpo.core.divergences import topk_divergence
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
                     advantages: torch.Tensor, teacher: TeacherScores | None, totals: torch.Tensor, pad_id: int,
                     with_entropy: bool) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """The loss of the responses ``part`` (one micro-batch; ``teacher``, ``old_lp`` and ``advantages`` already cut
    to it), with the whole mini-batch's denominators ``totals`` (tokens, sequences; all ranks), its metrics and
    the student's token entropies (or None)."""
    a, device = cfg.algorithm, next(model.parameters()).device
    R = part.response_ids.shape[1]
    mask = part.response_mask.to(device)
    inputs, rows = micro_batch_inputs(model, encoded, part.prompt_index, pad_id=pad_id, device=device)
    gather = teacher.topk_ids[:, :R].to(device) if dense_loss(cfg) else None
    stats = response_stats(model, inputs, part.response_ids.to(device), mask, prompt_index=rows,
                           temperature=cfg.rollout.temperature, with_entropy=with_entropy, gather=gather)
    agg = dict(total_tokens=float(totals[0]), total_seqs=float(totals[1]), norm_length=cfg.rollout.max_new_tokens)
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
