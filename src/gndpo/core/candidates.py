"""Dense (top-k) distillation as a policy gradient: a reward for every candidate token of a position, not only for
the one the student sampled. An extension beyond arXiv 2606.09091 (``algorithm.dense_mode=reward``).

At a response position t the teacher's top-k ids plus the tail bucket are K + 1 candidates ``c`` (the buckets of
``divergences.py``), with the teacher's probabilities ``p_c`` and the pre-update student's ``q_c``. The divergence
``D_t(q)`` depends on the position's distribution only; using ``-D_t`` as the advantage of the *sampled* token gives
``E_{y ~ q}[-D_t grad log q(y)] = -D_t sum_c grad q_c = 0``: no expected gradient, only noise (measured: greedy
accuracy 0 % on the lab, the divergence rising tenfold). Instead every candidate gets the negative functional
derivative of the divergence at the old student,

    r_t(c) = -dD_t / dq_c
        reverse_kl  log p_c - log q_c         (the exact derivative is this minus 1; the paper's sampled reward)
        forward_kl  p_c / q_c
        jsd         (1 - beta) (log m_c - log q_c),   m = beta p + (1 - beta) q

(a constant per position does not change the gradient: ``sum_c grad q_c = 0`` over all K + 1 candidates), clamped
(``clamp``, as the sampled reward is) and normalized with statistics that are expectations under the old student,
float64, over every valid position (and every rank, through ``reduce``):

    mean = sum_t sum_c w_t(c) r_t(c) / N        E2 = sum_t sum_c w_t(c) r_t(c)^2 / N        w_t = q_t / sum_c q_t(c)
    var  = (E2 - mean^2) * N / (N - 1)          A_t(c) = (r_t(c) - mean) * rsqrt(var + eps)   (gndpo; opd: A = r)

(``scope`` group / sequence / teacher: the same within the segment; ``moments``: running statistics given by the
caller, batch scope). The loss per position is PPO's clipped surrogate taken in expectation over the candidates,

    L_t = -sum_c q_c min(rho_c A_t(c), clip(rho_c, 1 - eps_low, 1 + eps_high) A_t(c)),   rho_c = q'_c / q_c

with ``q'`` the current student; at the old weights its gradient is ``-sum_c grad q_c A_t(c)``, which for an
unclamped batch is ``(1 / sigma) grad D_t``: the mean cancels, so what GNDPO's normalization leaves is the clamp and
one batch-wide scale.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gndpo.core.advantages import (
    SCOPES, Reduce, _summaries, _teacher_metrics, masked_moments, moments_mean_var, segment_sums,
)
from gndpo.core.divergences import buckets, teacher_rest
from gndpo.core.losses import aggregate_loss

LOG_RATIO_BOUND = 20.0  # as the ppo loss: exp of the candidate log-ratio is taken within +-20


def _reverse_kl(teacher: torch.Tensor, student: torch.Tensor, beta: float | None) -> torch.Tensor:
    return teacher - student


def _forward_kl(teacher: torch.Tensor, student: torch.Tensor, beta: float | None) -> torch.Tensor:
    return torch.exp(teacher - student)


def _jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float | None) -> torch.Tensor:
    if beta is None or not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
    return (1.0 - beta) * (mixture - student)


_REWARDS = {"reverse_kl": _reverse_kl, "forward_kl": _forward_kl, "jsd": _jsd}


def candidate_rewards(
    name: str,
    *,
    teacher_topk_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    student_rest: torch.Tensor,
    beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards ``-dD/dq`` (..., k + 1), the student's log-probs of the candidates (..., k + 1)) from the teacher's
    top-k log-probs (..., k) and the student's of the same ids (..., k) and of the rest (...). Float64, detached."""
    if name not in _REWARDS:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(sorted(_REWARDS))}")
    t_top = teacher_topk_logprobs.detach().double()
    teacher = buckets(t_top, teacher_rest(t_top))  # (..., k + 1)
    student = buckets(student_topk_logprobs.detach().double(), student_rest.detach().double())  # (..., k + 1)
    return _REWARDS[name](teacher, student, beta), student


def sampled_candidate(response_ids: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Which candidate each sampled token is (B, L): its place among the teacher's top-k ids (B, L, k), else k
    (the tail)."""
    hit = topk_ids == response_ids.unsqueeze(-1)  # (B, L, k)
    k = topk_ids.shape[-1]
    return torch.where(hit.any(-1), hit.int().argmax(-1), k)  # (B, L)


def _position_moments(r64: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_q[r], E_q[r^2]) per position (B, L), 0 at padding; q renormalized over the candidates in float64."""
    w = torch.softmax(torch.where(valid[..., None], old_logprobs.double(), 0.0), dim=-1)  # (B, L, C)
    r = torch.where(w > 0, r64, 0.0)  # a candidate of zero mass is never read (its reward may be clamped inf)
    m = valid.double()
    return (w * r).sum(-1) * m, (w * r * r).sum(-1) * m  # (B, L) each


def clamp_rewards(rewards: torch.Tensor, response_mask: torch.Tensor, clamp: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, clamped) candidate rewards (B, L, C), float64, 0 at padding; NaN, or inf without a clamp, raise."""
    valid = response_mask.bool()
    raw = torch.where(valid[..., None], rewards.double(), 0.0)  # (B, L, C)
    if torch.isnan(raw).any():
        raise ValueError(f"candidate rewards have {int(torch.isnan(raw).sum())} NaN values at response positions")
    if clamp is None:
        if not torch.isfinite(raw).all():
            raise ValueError("candidate rewards are infinite where the student gives a candidate no mass and clamp "
                             "is None; set a clamp bound (the paper uses 5)")
        return raw, raw
    if not clamp > 0:
        raise ValueError(f"clamp must be positive or None, got {clamp}")
    return raw, raw.clamp(-clamp, clamp)


def candidate_moments(
    rewards: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor, clamp: float | None = 5.0,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_t E_q[r_t], sum_t E_q[r_t^2], N) of the clamped rewards (B, L, C) over the valid positions (B, L),
    float64 scalars, all-reduced if ``reduce``: the batch statistics, and what running statistics accumulate."""
    valid = response_mask.bool()
    e1, e2 = _position_moments(clamp_rewards(rewards, valid, clamp)[1], old_logprobs, valid)
    s, _, n = masked_moments(e1, valid, reduce=None)
    stats = torch.stack([s, torch.where(valid, e2, 0.0).sum(), n])
    stats = stats if reduce is None else reduce(stats, "sum")
    return stats[0], stats[1], stats[2]


def candidate_advantages(
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    sampled: torch.Tensor,
    *,
    clamp: float | None = 5.0,
    scope: str = "batch",
    eps: float = 1e-8,
    group_ids: torch.Tensor | None = None,
    reduce: Reduce | None = None,
    moments: Sequence[float] | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_names: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """(advantages (B, L, C), float32, 0 at padding; metrics) from ``candidate_rewards``' rewards and old log-probs
    (B, L, C), normalized as the module docstring says (``scope="none"``: clamped only, OPD).

    ``sampled`` (B, L): the sampled token's candidate (``sampled_candidate``); the ``adv_*`` metrics are those of
    the sampled token's candidate advantage, ``reward_*``/``clamp_frac`` expectations under the old student."""
    if scope not in SCOPES:
        raise ValueError(f"unknown normalization scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    if moments is not None and scope != "batch":
        raise ValueError(f"given moments (running statistics) apply to scope='batch' only, not {scope!r}")
    if rewards.shape != old_logprobs.shape or rewards.shape[:-1] != response_mask.shape or \
            sampled.shape != response_mask.shape:
        raise ValueError(f"expected rewards and old log-probs (B, L, C), mask and sampled (B, L), got "
                         f"{tuple(rewards.shape)}, {tuple(old_logprobs.shape)}, {tuple(response_mask.shape)}, "
                         f"{tuple(sampled.shape)}")
    valid = response_mask.bool()  # (B, L)
    raw, r64 = clamp_rewards(rewards, valid, clamp)  # (B, L, C) each
    e1, e2 = _position_moments(r64, old_logprobs, valid)  # (B, L) each
    if scope == "none":
        adv = r64
    elif scope == "batch":
        if moments is None:
            s, ss, n = candidate_moments(rewards, old_logprobs, valid, clamp, reduce)
        else:
            s, ss, n = (torch.tensor(float(v), dtype=torch.float64, device=r64.device) for v in moments)
        if n < 2:
            raise ValueError(f"batch-normalized advantages need at least 2 valid response tokens, got {int(n)}")
        mean, var = moments_mean_var(s, ss, n)
        adv = (r64 - mean) * torch.rsqrt(var + eps)  # (B, L, C)
    else:
        if scope == "teacher":
            if teacher_ids is None:
                raise ValueError("scope='teacher' needs teacher_ids, one teacher per response (B,), and teacher_names")
            segment, count, seg_reduce = teacher_ids.to(r64.device), len(teacher_names), reduce
        elif scope == "sequence":
            segment, count, seg_reduce = torch.arange(r64.shape[0], device=r64.device), r64.shape[0], None
        elif group_ids is None:
            raise ValueError("scope='group' needs group_ids, one id per response (B,)")
        else:
            _, segment = torch.unique(group_ids, return_inverse=True)  # (B,)
            count, seg_reduce = int(segment.max()) + 1 if segment.numel() else 0, None
        rows = torch.stack([e1.sum(-1), e2.sum(-1), valid.double().sum(-1)], -1)  # (B, 3)
        s, ss, n = segment_sums(rows, segment, count, seg_reduce).unbind(-1)  # (S,) each
        enough = n >= 2
        mean, var = moments_mean_var(s, ss, torch.where(enough, n, 2.0))  # (S,)
        scale = torch.where(enough, torch.rsqrt(var + eps), 0.0)  # (S,)
        adv = (r64 - mean[segment, None, None]) * scale[segment, None, None]  # (B, L, C)
    adv = adv * valid[..., None].double()
    w = torch.softmax(torch.where(valid[..., None], old_logprobs.double(), 0.0), dim=-1)  # (B, L, C)
    clamped = (w * (raw.abs() > clamp).double()).sum(-1) if clamp is not None else torch.zeros_like(e1)  # (B, L)
    chosen = adv.gather(-1, sampled.long().unsqueeze(-1)).squeeze(-1)  # (B, L)
    finite = valid[..., None].expand_as(raw) & torch.isfinite(raw)
    stats = _summaries({"reward": (e1, valid), "reward_sq": (e2, valid), "candidate_reward": (r64, finite),
                        "clamped": (clamped, valid), "adv": (chosen, valid), "abs_adv": (chosen.abs(), valid)}, reduce)
    mean_r, n = stats["reward_mean"], stats["reward_count"]
    var_r = max(stats["reward_sq_mean"] - mean_r * mean_r, 0.0) * n / (n - 1) if n > 1 else 0.0
    metrics = {"reward_mean": mean_r, "reward_std": math.sqrt(var_r), "reward_min": stats["candidate_reward_min"],
               "reward_max": stats["candidate_reward_max"], "clamp_frac": stats["clamped_mean"],
               "adv_mean": stats["adv_mean"], "adv_std": stats["adv_std"], "adv_max_abs": stats["abs_adv_max"],
               "num_tokens": n}
    if teacher_ids is not None:
        metrics.update(_teacher_metrics(e1, clamped, valid, teacher_ids.to(r64.device), tuple(teacher_names), reduce))
    return adv.float(), metrics


def candidate_policy_loss(
    *,
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    **agg_options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate over the candidates (module docstring): old and current log-probs and advantages
    (B, L, C), mask (B, L); aggregated with ``agg_mode`` (``aggregate_loss``; ``agg_options`` its denominators).
    Metrics: clip_frac (the old student's mass on clipped candidates), approx_kl (k1) and approx_kl_k3 of the old
    over the current candidate distribution, ratio_mean (the current mass on the candidates, ~1), ratio_max."""
    if not (old_logprobs.shape == logprobs.shape == advantages.shape) or logprobs.shape[:-1] != response_mask.shape:
        raise ValueError(f"expected (B, L, C) log-probs and advantages and a (B, L) mask, got "
                         f"{tuple(old_logprobs.shape)}, {tuple(logprobs.shape)}, {tuple(advantages.shape)}, "
                         f"{tuple(response_mask.shape)}")
    valid = response_mask.bool()[..., None]  # (B, L, 1)
    old = torch.where(valid, old_logprobs.detach(), 0.0)  # (B, L, C)
    lp = torch.where(valid, logprobs, 0.0)  # (B, L, C)
    adv = torch.where(valid, advantages.detach(), 0.0).to(lp.dtype)  # (B, L, C)
    log_ratio = (lp - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B, L, C)
    ratio = torch.exp(log_ratio)
    weight = old.exp()  # (B, L, C): q_c
    unclipped = ratio * adv
    clipped_term = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss_mat = -(weight * torch.minimum(unclipped, clipped_term)).sum(-1)  # (B, L)
    loss = aggregate_loss(loss_mat, response_mask, agg_mode, **agg_options)
    with torch.no_grad():
        m = response_mask.bool()
        n = m.sum().clamp_min(1)

        def mean(x: torch.Tensor) -> float:  # (B, L) -> over the valid positions
            return float(torch.where(m, x, 0.0).sum() / n)

        lr = log_ratio.detach()
        metrics = {"clip_frac": mean((weight * (clipped_term < unclipped)).sum(-1)),
                   "approx_kl": mean((weight * -lr).sum(-1)),
                   "approx_kl_k3": mean((weight * (torch.expm1(lr) - lr)).sum(-1)),
                   "ratio_mean": mean((weight * ratio.detach()).sum(-1)),
                   "ratio_max": float(torch.where(valid, ratio.detach(), -torch.inf).max()) if m.any() else 0.0}
    return loss, metrics
