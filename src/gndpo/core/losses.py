"""Policy losses and loss aggregation.

Per-token losses, for log-probs ``lp`` under the current weights, ``old`` under the weights that
sampled, advantages ``A`` and response mask ``m`` (all (B, L)); ``sg`` is stop-gradient:

- ``gspo_token`` (GSPO, arXiv 2507.18071, token form; the GNDPO paper's update, arXiv 2606.09091):
      log s_t = lp_t - sg(lp_t) + sg(mean_{t in seq}(lp - old))      clamped at max 10
      loss_t  = max(-A_t s_t, -A_t clip(s_t, 1 - eps_low, 1 + eps_high))
  The value of s_t is the sequence's geometric-mean ratio; its gradient w.r.t. lp_t is s_t.
- ``ppo``: r_t = exp(clamp(lp - old, -20, 20)); loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),
  and for A < 0 the dual clip min(loss_t, -A c), c = ``clip_ratio_c`` = 3 (verl's vanilla loss).
- ``reinforce``: loss_t = -A_t lp_t (no ratio, no clipping: ``clip_low``/``clip_high`` do not apply).

Aggregation of the (B, L) loss matrix (``aggregate_loss``), n_i = valid tokens of sequence i:

    token-mean               sum_{i,t} loss m / sum(m)
    seq-mean-token-sum       mean_i  sum_t loss m
    seq-mean-token-mean      mean_i  (sum_t loss m) / n_i
    seq-mean-token-sum-norm  mean_i  (sum_t loss m) / norm_length     norm_length defaults to L

``mean_i`` runs over sequences with at least one valid token. For gradient accumulation pass
``total_tokens`` / ``total_seqs`` (the whole batch's counts): they replace the local denominators,
so the micro-batch losses sum exactly to the full-batch loss.

How this module departs from the official verl code:
- The official GSPO loss ignores ``loss_agg_mode`` (it always uses seq-mean-token-mean); here every
  loss honours the chosen mode. The paper presets pick seq-mean-token-mean, which reproduces it.
- ``seq-mean-token-sum-norm`` divides each sequence's sum by ``norm_length`` and then averages over
  sequences, as in current verl; older verl divided the batch sum by L without averaging.
- Padding positions are replaced (``torch.where``) before any arithmetic, so inf/NaN there reach
  neither the loss nor the gradients; empty sequences contribute 0 instead of NaN.
- ``approx_kl`` is k1 = mean(old - lp) over valid tokens (verl's ``ppo_kl``); k3 is reported too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
MAX_LOG_RATIO = 10.0  # GSPO's clamp on the log sequence ratio
PPO_LOG_RATIO_BOUND = 20.0  # verl clamps the PPO log-ratio to +-20 before exp

# A loss maps sanitized (B, L) tensors to (loss matrix, ratio used, clipped-token mask, extra metrics).
PolicyLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]

_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register a per-token policy loss under ``name``."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        _LOSSES[name] = fn
        return fn

    return decorator


def policy_loss_names() -> list[str]:
    return sorted(_LOSSES)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str,
    *,
    norm_length: float | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, L) loss matrix to a scalar under ``agg_mode`` (see the module docstring)."""
    if agg_mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {agg_mode!r}; valid modes: {', '.join(AGG_MODES)}")
    for name, value in (("norm_length", norm_length), ("total_tokens", total_tokens), ("total_seqs", total_seqs)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    valid = mask.bool()  # (B, L)
    loss_mat = torch.where(valid, loss_mat, 0.0)  # (B, L)
    if agg_mode == "token-mean":
        denom = total_tokens if total_tokens is not None else valid.sum().clamp_min(1)
        return loss_mat.sum() / denom

    seq_sum = loss_mat.sum(-1)  # (B,)
    seq_tokens = valid.sum(-1)  # (B,)
    if agg_mode == "seq-mean-token-sum":
        per_seq = seq_sum  # (B,)
    elif agg_mode == "seq-mean-token-mean":
        per_seq = seq_sum / seq_tokens.clamp_min(1)  # (B,)
    else:  # seq-mean-token-sum-norm
        per_seq = seq_sum / (norm_length if norm_length is not None else loss_mat.shape[-1])  # (B,)
    denom = total_seqs if total_seqs is not None else (seq_tokens > 0).sum().clamp_min(1)
    return per_seq.sum() / denom


def compute_policy_loss(
    name: str,
    *,
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss of the policy loss ``name`` and its metrics (python floats).

    ``options``: ``norm_length``, ``total_tokens``, ``total_seqs`` go to ``aggregate_loss``; the rest to
    the loss itself (e.g. ``clip_ratio_c`` for ``ppo``). Metrics: clip_frac, approx_kl (k1),
    approx_kl_k3, ratio_mean, ratio_max (over valid tokens of this call), plus loss-specific ones.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {', '.join(policy_loss_names())}")
    if agg_mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {agg_mode!r}; valid modes: {', '.join(AGG_MODES)}")
    shapes = {tuple(t.shape) for t in (old_logprobs, logprobs, advantages, response_mask)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"expected (B, L) tensors of one shape, got shapes {sorted(shapes)}")
    agg_options = {k: options.pop(k) for k in ("norm_length", "total_tokens", "total_seqs") if k in options}
    fn = _LOSSES[name]
    accepted = set(inspect.signature(fn).parameters) - {"old_lp", "lp", "adv", "valid", "clip_low", "clip_high"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"policy loss {name!r} does not take option(s) {sorted(unknown)}; it takes {sorted(accepted) or 'none'}"
        )

    valid = response_mask.bool()  # (B, L)
    lp = torch.where(valid, logprobs, 0.0)  # (B, L)
    old_lp = torch.where(valid, old_logprobs.detach(), 0.0)  # (B, L)
    adv = torch.where(valid, advantages.detach(), 0.0)  # (B, L)
    loss_mat, ratio, clipped, extra = fn(
        old_lp=old_lp, lp=lp, adv=adv, valid=valid, clip_low=clip_low, clip_high=clip_high, **options
    )
    loss = aggregate_loss(loss_mat, valid, agg_mode, **agg_options)
    return loss, _metrics(lp.detach(), old_lp, ratio.detach(), clipped, valid, extra)


def _metrics(lp, old_lp, ratio, clipped, valid, extra) -> dict[str, float]:
    m = valid.to(lp.dtype)  # (B, L)
    n = m.sum().clamp_min(1)

    def mean(x: torch.Tensor) -> float:
        return float(torch.where(valid, x, 0.0).sum() / n)

    log_ratio = lp - old_lp  # (B, L), 0 at padding
    metrics = {
        "clip_frac": mean(clipped.to(lp.dtype)),
        "approx_kl": mean(-log_ratio),
        "approx_kl_k3": mean(torch.expm1(log_ratio) - log_ratio),
        "ratio_mean": mean(ratio),
        "ratio_max": float(torch.where(valid, ratio, -torch.inf).max()) if valid.any() else 0.0,
    }
    metrics.update({k: mean(v) for k, v in extra.items()})
    return metrics


def _seq_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over valid tokens, 0 for empty sequences; (B, L) -> (B,)."""
    return torch.where(valid, x, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)


@register_policy_loss("gspo_token")
def gspo_token_loss(*, old_lp, lp, adv, valid, clip_low, clip_high):
    seq_log_ratio = _seq_mean(lp.detach() - old_lp, valid)  # (B,)
    log_s = lp - lp.detach() + seq_log_ratio[:, None]  # (B, L), value = sequence log-ratio
    s = torch.exp(log_s.clamp(max=MAX_LOG_RATIO))  # (B, L)
    loss_unclipped = -adv * s  # (B, L)
    loss_clipped = -adv * s.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, L)
    clipped = loss_clipped > loss_unclipped  # (B, L)
    return torch.maximum(loss_unclipped, loss_clipped), s, clipped, {}


@register_policy_loss("ppo")
def ppo_loss(*, old_lp, lp, adv, valid, clip_low, clip_high, clip_ratio_c: float = 3.0):
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
    ratio = torch.exp((lp - old_lp).clamp(-PPO_LOG_RATIO_BOUND, PPO_LOG_RATIO_BOUND))  # (B, L)
    loss_unclipped = -adv * ratio  # (B, L)
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, L)
    clip_loss = torch.maximum(loss_unclipped, loss_clipped)  # (B, L)
    dual_bound = -adv * clip_ratio_c  # (B, L)
    dual_clipped = (adv < 0) & (clip_loss > dual_bound)  # (B, L)
    loss = torch.where(adv < 0, torch.minimum(clip_loss, dual_bound), clip_loss)  # (B, L)
    clipped = loss_clipped > loss_unclipped  # (B, L)
    return loss, ratio, clipped, {"clip_frac_lower": dual_clipped.to(lp.dtype)}


@register_policy_loss("reinforce")
def reinforce_loss(*, old_lp, lp, adv, valid, clip_low, clip_high):
    ratio = torch.exp(lp.detach() - old_lp)  # (B, L), reported only
    return -adv * lp, ratio, torch.zeros_like(valid), {}
