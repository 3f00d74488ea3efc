"""GNDPO and the paper's OPD (arXiv 2606.09091) inside stock verl 0.9.x, as a verl plugin.

verl imports this module in every process that imports verl (the driver and each Ray worker): ``pip install
gndpo`` declares it in the ``verl.plugins`` entry-point group, which verl loads at import time unless
``VERL_USE_EXTERNAL_PLUGINS=none``; ``VERL_USE_EXTERNAL_MODULES=gndpo.integrations.verl`` loads it explicitly.
It registers, in verl's own registries:

- advantage estimators ``gndpo`` and ``gndpo_opd`` (``algorithm.adv_estimator``). verl's driver calls them once
  on the whole training batch (every prompt, every sample; ``verl.trainer.ppo.ray_trainer.compute_advantage``),
  so GNDPO's statistics are global by construction, whatever the data-parallel split of the actor. Their input
  is verl's ``token_level_rewards``, which must hold the per-token log-ratio ``teacher_lp - student_lp``: the
  ``gndpo`` trainer below puts it there.
- the policy loss ``gndpo_gspo_token`` (``actor_rollout_ref.actor.policy_loss.loss_mode``): GSPO-token from
  ``gndpo.core.losses`` with verl's ``loss_agg_mode`` and verl's global-batch normalization, so the micro-batch
  losses of all ranks add up to the full-batch loss.
- the trainer ``gndpo`` (``trainer.v1.trainer_mode``), in ``gndpo.integrations.verl_trainer``: verl's synchronous
  trainer, which before computing advantages replaces the reward with ``teacher_lp - old_log_probs`` from verl's
  teacher servers (``distillation.enabled``) and the actor's recomputed log-probs.

Options under ``algorithm.gndpo`` (all optional): ``clamp`` (5.0; null disables), ``eps`` (1e-8), ``scope``
(``batch`` for gndpo, ``none`` for gndpo_opd; also ``group``, ``sequence``), as in ``gndpo.core.advantages``.

How this departs from gndpo's own trainer: verl's teacher log-probs come from its vLLM/SGLang teacher servers
(prompt log-probs of the sampled tokens), the student's from verl's actor recompute; the loss's rollout-correction
weights (``algorithm.rollout_correction``) are refused rather than applied; verl's ``token-sum`` aggregation is not
offered (gndpo.core has no such mode).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from gndpo.core import compute_advantages, compute_policy_loss

logger = logging.getLogger(__name__)

ESTIMATORS = {"gndpo": "gndpo", "gndpo_opd": "opd"}  # verl name -> gndpo.core name
POLICY_LOSS = "gndpo_gspo_token"
OPTIONS = ("clamp", "eps", "scope")
_AGG_INFO = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def estimator_options(config: Any) -> dict[str, Any]:
    """The ``algorithm.gndpo`` options (clamp, eps, scope) from verl's algorithm config; {} when absent."""
    options = config.get("gndpo") if config is not None else None
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"algorithm.gndpo must be a mapping with keys {', '.join(OPTIONS)}; got {options!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"algorithm.gndpo has unknown key(s) {unknown}; valid keys: {', '.join(OPTIONS)}")
    return dict(options)


def group_ids_from_index(index: Any) -> torch.Tensor | None:
    """verl's per-response prompt uids (numpy objects) as integer group ids (B,)."""
    if index is None:
        return None
    _, inverse = np.unique(np.asarray(index, dtype=str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _distillation_estimator(core_name: str):
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None,
                  index: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        options = estimator_options(config)
        if options.get("scope") == "group" and index is None:
            raise ValueError("algorithm.gndpo.scope=group needs the batch's prompt uids (verl's 'uid'), which "
                             "this batch lacks")
        advantages, _ = compute_advantages(
            core_name,
            teacher_logprobs=token_level_rewards,  # (B, L): teacher - student, so student is 0 here
            student_logprobs=torch.zeros_like(token_level_rewards),
            response_mask=response_mask,
            group_ids=group_ids_from_index(index),
            **options,
        )
        return advantages, advantages  # verl's (advantages, returns), as its outcome estimators return

    estimator.__name__ = f"compute_{core_name}_advantage"
    estimator.__doc__ = (f"gndpo.core's {core_name!r} advantages of verl's token_level_rewards (= teacher - student "
                         "log-ratio per response token) over the whole batch; (B, L) each.")
    return estimator


compute_gndpo_advantage = _distillation_estimator("gndpo")
compute_opd_advantage = _distillation_estimator("opd")


def _aggregation_totals(loss_agg_mode: str, info: Mapping[str, Any]) -> dict[str, float]:
    """gndpo.core's aggregation options reproducing verl's ``agg_loss`` with its global-batch info.

    verl scales each rank's micro-batch loss by dp_size / (global tokens or sequences) because FSDP averages the
    ranks' gradients; gndpo.core divides by ``total_tokens`` / ``total_seqs``, so those are global / dp_size.
    """
    if loss_agg_mode == "token-sum":
        raise ValueError(f"{POLICY_LOSS} does not offer verl's loss_agg_mode 'token-sum'; use token-mean, "
                         "seq-mean-token-sum, seq-mean-token-mean (the paper's) or seq-mean-token-sum-norm")
    dp_size = info.get("dp_size") or 1
    tokens, seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    totals: dict[str, float] = {}
    if loss_agg_mode == "token-mean":
        if tokens is not None:
            totals["total_tokens"] = float(tokens) / dp_size
        elif dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    else:
        if seqs is not None:
            totals["total_seqs"] = float(seqs) / dp_size
        elif dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        if loss_agg_mode == "seq-mean-token-sum-norm" and info.get("loss_scale_factor") is not None:
            totals["norm_length"] = float(info["loss_scale_factor"])
    return totals


@core_algos.register_policy_loss(POLICY_LOSS)
def compute_policy_loss_gndpo_gspo_token(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO-token (gndpo.core) for verl's actor: (B, L) tensors in, (scalar loss, verl's pg metrics) out."""
    if config is None:
        raise ValueError(f"{POLICY_LOSS} needs verl's actor config (clip ratios, global batch info)")
    if rollout_is_weights is not None:
        raise ValueError(f"{POLICY_LOSS} does not apply rollout-correction weights; set "
                         "algorithm.rollout_correction to null, or use verl's own 'gspo' loss")
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    info = {k: v for k, v in (config.get("global_batch_info") or {}).items() if k in _AGG_INFO}
    loss, metrics = compute_policy_loss(
        "gspo_token",
        old_logprobs=old_log_prob,
        logprobs=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        agg_mode=loss_agg_mode,
        **_aggregation_totals(loss_agg_mode, info),
    )
    return loss, {
        "actor/pg_clipfrac": metrics["clip_frac"],
        "actor/ppo_kl": metrics["approx_kl"],
        "actor/pg_clipfrac_lower": 0.0,  # GSPO-token has no dual clip
    }


for _name, _fn in (("gndpo", compute_gndpo_advantage), ("gndpo_opd", compute_opd_advantage)):
    core_algos.register_adv_est(_name)(_fn)


def _register_trainer() -> None:
    """The trainer needs verl's V1 trainer stack (Ray, TransferQueue); processes without it still get the rest."""
    try:
        import gndpo.integrations.verl_trainer  # noqa: F401  (registers trainer_mode 'gndpo')
    except ImportError as err:
        logger.warning("gndpo: verl trainer_mode 'gndpo' is not registered in this process (%s); the "
                       "estimators and the policy loss are", err)


_register_trainer()
