"""Advantage estimators: GNDPO (arXiv 2606.09091), raw on-policy distillation (OPD), GRPO outcome.

Distillation reward per response token (B responses, L positions, mask m):

    r_t = clamp(log p_teacher(o_t) - log p_student(o_t), -c, c)        c = 5; None disables the clamp
    OPD:    A_t = r_t * m_t
    GNDPO:  A_t = (r_t - mean) * rsqrt(var + 1e-8) * m_t
            mean = sum(r m) / (sum(m) + 1e-8)
            var  = [sum((r - mean)^2 m) / (sum(m) + 1e-8)] * N / (N - 1),   N = sum(m)

pooled over every valid token of the whole batch (all prompts, all samples, all data-parallel ranks).
This is verl's ``masked_mean`` / ``masked_var(unbiased=True)`` as used by the official GNDPO code.

GRPO (outcome reward R per response, groups of G samples of one prompt):

    A_i = (R_i - mean_g) / (std_g + 1e-6)     std_g unbiased (torch.std); broadcast over the response tokens

How this module departs from the official verl code:
- Statistics are built from (sum, sum of squares, count) accumulated in float64, so a data-parallel
  caller can all-reduce three numbers through ``reduce``; the verl two-pass formula is reproduced
  algebraically (sum((r - mean)^2) = sum_sq - 2 mean sum + N mean^2), equal to it within float error.
- NaN at a response position, a non-finite reward with the clamp off, and a batch with fewer than
  2 valid tokens raise ``ValueError`` instead of silently producing NaN.
- Extensions, each off under the paper preset: ``clamp=None``; ``scope`` = ``group`` (tokens of all
  samples of one prompt) or ``sequence`` (tokens of one response) instead of ``batch``; ``moments``:
  batch-scope statistics given by the caller (running statistics over steps, ``normstats.py``). Groups and
  sequences are assumed to live whole on one rank: only the batch scope's statistics go through
  ``reduce`` (metrics always do).
- Several teachers (``teacher_ids`` (B,), one per response, indexing ``teacher_names``): the statistics are the
  batch's (the paper's) or, with ``scope="teacher"``, those of every token the same teacher scored, all ranks
  pooled (a teacher's responses span ranks):

      A_t = (r_t - mean_k) * rsqrt(var_k + 1e-8) * m_t        k = the teacher of the response holding t

  with ``mean_k``/``var_k`` the formulas above over teacher k's tokens; a teacher with fewer than 2 tokens in
  the batch gives its tokens advantage 0. Per-teacher metrics ``teacher/{name}/reward_mean``, ``clamp_frac``
  and ``token_share`` (its share of the batch's response tokens) are reported either way.
- GRPO: a group of one sample keeps its raw reward (mean 0, std 1), as verl does.

``reduce(tensor, op)`` receives a float64 tensor and ``op`` in {"sum", "min", "max"} and returns the
all-reduced tensor; None means a single process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
AdvantageFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]

SCOPES = ("batch", "group", "sequence", "none", "teacher")
_MEAN_EPS = 1e-8  # verl's masked_mean denominator epsilon

_ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator under ``name``; it takes keyword tensors and returns (advantages, metrics)."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGES[name] = fn
        return fn

    return decorator


def advantage_names() -> list[str]:
    return sorted(_ADVANTAGES)


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """Run the estimator registered as ``name``; returns ((B, L) advantages, metrics of python floats)."""
    if name not in _ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {', '.join(advantage_names())}")
    return _ADVANTAGES[name](**kwargs)


# ----------------------------------------------------------------------------------------------
# Masked statistics


def _reduce(stats: torch.Tensor, op: str, reduce: Reduce | None) -> torch.Tensor:
    return stats if reduce is None else reduce(stats, op)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, sum of squares, count) of ``x`` over the mask, float64 scalars, all-reduced if ``reduce``.

    Values at masked-out positions are never read.
    """
    valid = mask.bool()
    x64 = torch.where(valid, x.detach().double(), 0.0)  # (B, L)
    stats = torch.stack([x64.sum(), x64.square().sum(), valid.sum().double()])  # (3,)
    stats = _reduce(stats, "sum", reduce)
    return stats[0], stats[1], stats[2]


def moments_mean_var(s: torch.Tensor, ss: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's masked_mean and unbiased masked_var from moments (elementwise; needs n >= 2)."""
    mean = s / (n + _MEAN_EPS)
    centered_sq = (ss - 2.0 * mean * s + n * mean * mean).clamp_min(0.0)  # sum((x - mean)^2)
    var = centered_sq / (n + _MEAN_EPS) * (n / (n - 1.0))
    return mean, var


def _check_no_nan(name: str, x: torch.Tensor, valid: torch.Tensor) -> None:
    count = int((torch.isnan(x) & valid).sum())
    if count:
        raise ValueError(
            f"{name} has {count} NaN values at response positions (of {int(valid.sum())} valid tokens); "
            "padding may hold anything, response tokens may not"
        )


def _summaries(named: dict[str, tuple[torch.Tensor, torch.Tensor]], reduce: Reduce | None) -> dict[str, float]:
    """{name}_mean/_std/_min/_max/_count over each (values, valid) pair; std unbiased; 0.0 when empty.

    Uses three ``reduce`` calls in all (one per op), whatever the number of names.
    """
    sums, mins, maxs = [], [], []
    for x, valid in named.values():
        x64 = x.detach().double()
        zero = torch.where(valid, x64, 0.0).flatten()
        sums += [zero.sum(), zero.square().sum(), valid.sum().double()]
        inf = torch.full((1,), math.inf, dtype=torch.float64, device=x.device)
        mins.append(torch.cat([torch.where(valid, x64, math.inf).flatten(), inf]).min())
        maxs.append(torch.cat([torch.where(valid, x64, -math.inf).flatten(), -inf]).max())
    sums_t = _reduce(torch.stack(sums), "sum", reduce).tolist()
    mins_t = _reduce(torch.stack(mins), "min", reduce).tolist()
    maxs_t = _reduce(torch.stack(maxs), "max", reduce).tolist()
    out: dict[str, float] = {}
    for i, name in enumerate(named):
        s, ss, n = sums_t[3 * i : 3 * i + 3]
        mean = s / n if n > 0 else 0.0
        var = max(ss - s * mean, 0.0) / (n - 1) if n > 1 else 0.0
        out[f"{name}_mean"] = mean
        out[f"{name}_std"] = math.sqrt(var)
        out[f"{name}_min"] = mins_t[i] if n > 0 else 0.0
        out[f"{name}_max"] = maxs_t[i] if n > 0 else 0.0
        out[f"{name}_count"] = n
    return out


def _with_advantage_metrics(
    named: dict[str, tuple[torch.Tensor, torch.Tensor]], adv: torch.Tensor, valid: torch.Tensor, reduce: Reduce | None
) -> dict[str, float]:
    """Summaries of ``named`` plus adv_mean/adv_std/adv_max_abs/num_tokens, in one set of reduce calls."""
    stats = _summaries({**named, "adv": (adv, valid), "abs_adv": (adv.abs(), valid)}, reduce)
    metrics = {k: v for k, v in stats.items() if not k.startswith(("adv_", "abs_adv_")) and not k.endswith("_count")}
    metrics.update(
        adv_mean=stats["adv_mean"], adv_std=stats["adv_std"], adv_max_abs=stats["abs_adv_max"],
        num_tokens=stats["adv_count"],
    )
    return metrics


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected (B, L) tensors of one shape, got {shapes}")


# ----------------------------------------------------------------------------------------------
# Distillation estimators


def _log_ratio(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """teacher - student at valid positions, 0 at padding; padding is replaced before any arithmetic."""
    _check_no_nan("teacher_logprobs", teacher, valid)
    _check_no_nan("student_logprobs", student, valid)
    teacher = torch.where(valid, teacher, 0.0)  # (B, L)
    student = torch.where(valid, student, 0.0)  # (B, L)
    log_ratio = teacher - student  # (B, L)
    _check_no_nan("teacher_logprobs - student_logprobs (both infinite)", log_ratio, valid)
    return log_ratio


def _clamp_reward(log_ratio: torch.Tensor, valid: torch.Tensor, clamp: float | None) -> torch.Tensor:
    if clamp is None:
        bad = int((~torch.isfinite(log_ratio) & valid).sum())
        if bad:
            raise ValueError(
                f"teacher_logprobs - student_logprobs has {bad} infinite values at response positions "
                "and clamp is None; set a clamp bound (the paper uses 5)"
            )
        return log_ratio
    if not clamp > 0:
        raise ValueError(f"clamp must be positive or None, got {clamp}")
    return log_ratio.clamp(-clamp, clamp)  # (B, L)


def distillation_reward(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
) -> torch.Tensor:
    """r = clamp(teacher - student, -clamp, clamp) at response positions, 0 at padding; (B, L).

    Not detached: gradients flow to both log-prob tensors (zero at padding and where clamped).
    """
    _check_shapes(teacher_logprobs=teacher_logprobs, student_logprobs=student_logprobs, response_mask=response_mask)
    valid = response_mask.bool()
    return _clamp_reward(_log_ratio(teacher_logprobs, student_logprobs, valid), valid, clamp)


def segment_sums(
    values: torch.Tensor, segment: torch.Tensor, num_segments: int, reduce: Reduce | None = None
) -> torch.Tensor:
    """Per-segment sums ``(S, K)`` of row values ``(B, K)`` (segment (B,) in [0, S)), float64, all-reduced if
    ``reduce`` (one call: every rank must pass the same ``num_segments``)."""
    out = torch.zeros(num_segments, values.shape[1], dtype=torch.float64, device=values.device)
    out.index_add_(0, segment, values.double())  # (S, K)
    return _reduce(out, "sum", reduce)


def _segment_normalize(
    r64: torch.Tensor, valid: torch.Tensor, segment: torch.Tensor, eps: float, num_segments: int | None = None,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """z-score ``r64`` (B, L) within segments of rows (segment (B,) in [0, S)); segments with < 2 tokens -> 0.
    ``reduce``: the segments span ranks (their moments are all-reduced)."""
    if num_segments is None:
        num_segments = int(segment.max()) + 1 if segment.numel() else 0
    m = valid.double()  # (B, L)
    rm = r64 * m  # (B, L)
    rows = torch.stack([rm.sum(-1), (rm * r64).sum(-1), m.sum(-1)], -1)  # (B, 3)
    s, ss, n = segment_sums(rows, segment, num_segments, reduce).unbind(-1)  # (S,) each
    enough = n >= 2  # (S,)
    mean, var = moments_mean_var(s, ss, torch.where(enough, n, 2.0))  # (S,), (S,)
    scale = torch.where(enough, torch.rsqrt(var + eps), 0.0)  # (S,)
    return (r64 - mean[segment, None]) * scale[segment, None] * m  # (B, L)


def distillation_signal(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-ratio, reward), float64 (B, L), detached, 0 at padding: the log-ratio and its clamp, the reward that
    the distillation estimators normalize."""
    _check_shapes(teacher_logprobs=teacher_logprobs, student_logprobs=student_logprobs, response_mask=response_mask)
    valid = response_mask.bool()  # (B, L)
    log_ratio = _log_ratio(teacher_logprobs.detach(), student_logprobs.detach(), valid).double()  # (B, L)
    return log_ratio, _clamp_reward(log_ratio, valid, clamp)


def _distillation_advantages(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None,
    eps: float,
    scope: str,
    group_ids: torch.Tensor | None,
    reduce: Reduce | None,
    moments: Sequence[float] | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_names: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    if scope not in SCOPES:
        raise ValueError(f"unknown normalization scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    if moments is not None and scope != "batch":
        raise ValueError(f"given moments (running statistics) apply to scope='batch' only, not {scope!r}: per-group "
                         "or per-sequence statistics have nothing to carry over from earlier steps")
    if teacher_ids is not None and (teacher_ids.shape != response_mask.shape[:1] or not teacher_names or (
            teacher_ids.numel() and not 0 <= int(teacher_ids.min()) <= int(teacher_ids.max()) < len(teacher_names))):
        raise ValueError(f"teacher_ids must hold one id in [0, {len(teacher_names)}) per response (B,) with "
                         f"teacher_names naming each, got shape {tuple(teacher_ids.shape)}")
    valid = response_mask.bool()  # (B, L)
    out_dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    log_ratio, r64 = distillation_signal(teacher_logprobs, student_logprobs, response_mask, clamp)
    m = valid.double()  # (B, L)

    if scope == "none":
        adv = r64 * m  # (B, L)
    elif scope == "batch":
        if moments is None:
            s, ss, n = masked_moments(r64, valid, reduce)
        else:  # running statistics (normstats.py): the caller joined this batch's moments with earlier steps'
            s, ss, n = (torch.tensor(float(v), dtype=torch.float64, device=r64.device) for v in moments)
        if n < 2:
            raise ValueError(
                f"batch-normalized advantages need at least 2 valid response tokens in the batch, got {int(n)}"
            )
        mean, var = moments_mean_var(s, ss, n)
        adv = (r64 - mean) * torch.rsqrt(var + eps) * m  # (B, L)
    elif scope == "teacher":
        if teacher_ids is None:
            raise ValueError("scope='teacher' needs teacher_ids, one teacher per response (B,), and teacher_names")
        adv = _segment_normalize(r64, valid, teacher_ids.to(r64.device), eps, len(teacher_names), reduce)  # (B, L)
    else:
        if scope == "sequence":
            segment = torch.arange(r64.shape[0], device=r64.device)  # (B,)
        elif group_ids is None:
            raise ValueError("scope='group' needs group_ids, one id per response (B,)")
        else:
            _, segment = torch.unique(group_ids, return_inverse=True)  # (B,)
        adv = _segment_normalize(r64, valid, segment, eps)  # (B, L)

    finite = valid & torch.isfinite(log_ratio)  # (B, L)
    clamped = log_ratio.abs() > clamp if clamp is not None else torch.zeros_like(valid)  # (B, L)
    named = {"reward": (r64, valid), "log_ratio": (log_ratio, finite), "clamped": (clamped.double(), valid)}
    metrics = _with_advantage_metrics(named, adv, valid, reduce)
    metrics["clamp_frac"] = metrics.pop("clamped_mean")
    for key in ("clamped_std", "clamped_min", "clamped_max", "log_ratio_std"):
        del metrics[key]
    if teacher_ids is not None:
        metrics.update(_teacher_metrics(r64, clamped, valid, teacher_ids.to(r64.device), teacher_names, reduce))
    return adv.to(out_dtype), metrics


def _teacher_metrics(
    r64: torch.Tensor, clamped: torch.Tensor, valid: torch.Tensor, teacher_ids: torch.Tensor,
    names: tuple[str, ...], reduce: Reduce | None,
) -> dict[str, float]:
    """``teacher/{name}/reward_mean``, ``clamp_frac`` and ``token_share`` over every rank's tokens (one reduce); a
    teacher that scored no token of the batch has NaN means and share 0."""
    m = valid.double()  # (B, L)
    rows = torch.stack([(r64 * m).sum(-1), (clamped.double() * m).sum(-1), m.sum(-1)], -1)  # (B, 3)
    s, c, n = segment_sums(rows, teacher_ids, len(names), reduce).unbind(-1)  # (T,) each
    total = float(n.sum())
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        count = float(n[k])
        out[f"teacher/{name}/reward_mean"] = float(s[k]) / count if count else math.nan
        out[f"teacher/{name}/clamp_frac"] = float(c[k]) / count if count else math.nan
        out[f"teacher/{name}/token_share"] = count / total if total else 0.0
    return out


@register_advantage("gndpo")
def gndpo_advantages(
    *,
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
    eps: float = 1e-8,
    scope: str = "batch",
    group_ids: torch.Tensor | None = None,
    reduce: Reduce | None = None,
    moments: Sequence[float] | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_names: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """GNDPO: clamped log-ratio z-scored over every valid token of the batch (``scope``). Detached.

    ``moments`` (sum, sum of squares, count), scope batch only: normalize with these statistics instead of the
    batch's own (running statistics, ``normstats.py``); None = the paper.
    ``teacher_ids`` (B,) / ``teacher_names``: which of several teachers scored each response (per-teacher metrics;
    ``scope="teacher"`` normalizes per teacher)."""
    return _distillation_advantages(
        teacher_logprobs, student_logprobs, response_mask, clamp, eps, scope, group_ids, reduce, moments,
        teacher_ids, tuple(teacher_names),
    )


@register_advantage("opd")
def opd_advantages(
    *,
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    clamp: float | None = 5.0,
    eps: float = 1e-8,
    scope: str = "none",
    group_ids: torch.Tensor | None = None,
    reduce: Reduce | None = None,
    moments: Sequence[float] | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_names: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """On-policy distillation: the clamped log-ratio itself (scope ``none``). Detached.

    Same options as ``gndpo``; ``opd`` with ``scope="batch"`` equals ``gndpo``.
    """
    return _distillation_advantages(
        teacher_logprobs, student_logprobs, response_mask, clamp, eps, scope, group_ids, reduce, moments,
        teacher_ids, tuple(teacher_names),
    )


# ----------------------------------------------------------------------------------------------
# Outcome-reward estimator


@register_advantage("grpo")
def grpo_advantages(
    *,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(R - group mean) / (group unbiased std + eps), broadcast over response tokens. Detached.

    ``norm_by_std=False`` keeps R - group mean (Dr. GRPO). ``reduce`` only pools the metrics.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape or response_mask.shape[:1] != rewards.shape:
        raise ValueError(
            f"expected rewards (B,), group_ids (B,), response_mask (B, L); got {tuple(rewards.shape)}, "
            f"{tuple(group_ids.shape)}, {tuple(response_mask.shape)}"
        )
    _check_no_nan("rewards", rewards, torch.ones_like(rewards, dtype=torch.bool))
    valid = response_mask.bool()  # (B, L)
    R = rewards.detach().double()  # (B,)
    _, segment = torch.unique(group_ids, return_inverse=True)  # (B,)
    num_groups = int(segment.max()) + 1 if segment.numel() else 0

    def per_group(values: torch.Tensor, how: str = "sum") -> torch.Tensor:  # (B,) -> (G,)
        out = torch.zeros(num_groups, dtype=torch.float64, device=R.device)
        return out.scatter_reduce_(0, segment, values, how, include_self=False)

    n, s, ss = per_group(torch.ones_like(R)), per_group(R), per_group(R * R)  # (G,) each
    high, low = per_group(R, "amax"), per_group(R, "amin")  # (G,)
    constant = high == low  # (G,): every sample got the same reward (singletons included)
    mean = torch.where(constant, high, s / n)  # (G,), exact for constant groups
    var = torch.where(n > 1, (ss - s * mean).clamp_min(0.0) / (n - 1).clamp_min(1.0), 0.0)  # (G,)
    std = torch.where(constant, 0.0, var.sqrt())  # (G,)
    single = n == 1  # verl: a lone sample keeps its raw reward
    mean, std = torch.where(single, 0.0, mean), torch.where(single, 1.0, std)

    score = R - mean[segment]  # (B,)
    if norm_by_std:
        score = score / (std[segment] + eps)
    adv = score[:, None] * valid.double()  # (B, L)

    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    named = {
        "outcome_reward": (R, torch.ones_like(segment, dtype=torch.bool)),  # over responses
        "zero_std_group": (constant.double(), torch.ones_like(constant)),  # over groups
    }
    metrics = _with_advantage_metrics(named, adv, valid, reduce)
    metrics["zero_std_group_frac"] = metrics.pop("zero_std_group_mean")
    for key in ("zero_std_group_std", "zero_std_group_min", "zero_std_group_max"):
        del metrics[key]
    return adv.to(out_dtype), metrics
