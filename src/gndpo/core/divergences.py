"""Divergences between the teacher's and the student's next-token distributions at each response position, over
the teacher's top-k tokens plus one tail bucket.

At a position the teacher reports its k most likely tokens ``T_1..T_k`` and their log-probs; the student's
log-probs of the same tokens and of everything else (``rest``, the log of the mass outside them) come from
:func:`gndpo.core.logprobs.hidden_token_stats`. Both distributions are then compared on k + 1 buckets: the k
tokens and the tail. The tail keeps each divergence a divergence between distributions (renormalizing both over
the top-k would call two distributions equal whenever they agree on the top-k's ratios). The teacher's tail is
``1 - sum_j p_T(T_j)``, floored at ``TAIL_FLOOR``: its top-k log-probs come rounded (float32: ~6e-8 per token,
bfloat16 engines more), so a smaller tail is below what they resolve.

With ``p`` the teacher's and ``q`` the student's bucket probabilities (per position):

    forward_kl  KL(p || q) = sum_b p_b (log p_b - log q_b)            mean-seeking; 0 where q covers p
    reverse_kl  KL(q || p) = sum_b q_b (log q_b - log p_b)            mode-seeking; large where q puts mass
                                                                      the teacher does not (its tail)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1
                (TRL's generalized JSD; its beta = 0 / 1 limits are forward_kl / reverse_kl here)

Every function takes log-probabilities of shape (..., k) and (...) and returns the per-position divergence
(...), differentiable with respect to the student's inputs. Registered by name like the policy losses.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

# The smallest teacher tail mass taken at face value (see the module docstring).
TAIL_FLOOR = 1e-6

DivergenceFn = Callable[..., torch.Tensor]
_DIVERGENCES: dict[str, DivergenceFn] = {}


def register_divergence(name: str) -> Callable[[DivergenceFn], DivergenceFn]:
    def decorator(fn: DivergenceFn) -> DivergenceFn:
        if name in _DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        _DIVERGENCES[name] = fn
        return fn

    return decorator


def divergence_names() -> list[str]:
    return sorted(_DIVERGENCES)


def teacher_rest(topk_logprobs: torch.Tensor, floor: float = TAIL_FLOOR) -> torch.Tensor:
    """log(1 - sum of the top-k probabilities) (...), at least log(floor); from (..., k) log-probs."""
    mass = topk_logprobs.double().exp().sum(-1)  # (...)
    return torch.log((1.0 - mass).clamp_min(floor)).to(topk_logprobs.dtype)


def buckets(topk_logprobs: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(..., k) and (...) log-probs -> (..., k + 1): the k tokens, then the tail."""
    return torch.cat([topk_logprobs, rest.unsqueeze(-1)], dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probs; a bucket of zero mass contributes 0 (0 log 0 = 0)."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype, device=a.device))
    return terms.sum(-1)


@register_divergence("forward_kl")
def forward_kl(teacher: torch.Tensor, student: torch.Tensor, beta: float | None = None) -> torch.Tensor:
    """KL(p_T || p_S) over the buckets (..., b) -> (...)."""
    return _kl(teacher, student)


@register_divergence("reverse_kl")
def reverse_kl(teacher: torch.Tensor, student: torch.Tensor, beta: float | None = None) -> torch.Tensor:
    """KL(p_S || p_T) over the buckets (..., b) -> (...)."""
    return _kl(student, teacher)


@register_divergence("jsd")
def jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float | None = 0.5) -> torch.Tensor:
    """beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S, over the buckets -> (...)."""
    if beta is None or not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; forward_kl and reverse_kl are its limits")
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def topk_divergence(
    name: str,
    *,
    teacher_topk_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    student_rest: torch.Tensor,
    beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(divergence (...), teacher tail mass (...), student tail mass (...)) of the distributions at each position,
    over the teacher's top-k tokens (the student's log-probs of the same ids, (..., k)) plus the tail.

    Computed in float32 at least; differentiable w.r.t. the student's log-probs."""
    if name not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(divergence_names())}")
    if teacher_topk_logprobs.shape != student_topk_logprobs.shape or \
            student_rest.shape != student_topk_logprobs.shape[:-1]:
        raise ValueError(f"expected (..., k), (..., k) and (...) log-probs, got {tuple(teacher_topk_logprobs.shape)}, "
                         f"{tuple(student_topk_logprobs.shape)} and {tuple(student_rest.shape)}")
    dtype = torch.promote_types(student_topk_logprobs.dtype, torch.float32)
    t_top = teacher_topk_logprobs.detach().to(dtype)
    t_rest = teacher_rest(t_top)
    teacher = buckets(t_top, t_rest)  # (..., k + 1)
    student = buckets(student_topk_logprobs.to(dtype), student_rest.to(dtype))  # (..., k + 1)
    value = _DIVERGENCES[name](teacher, student, beta)
    return value, t_rest.exp().detach(), student_rest.detach().to(dtype).exp()
