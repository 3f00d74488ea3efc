"""Pure-torch algorithm core: token log-probs, advantage estimators, policy losses, top-k divergences.

Imports only torch and the standard library; no config objects, no logging, no torch.distributed
(data-parallel callers pass a ``reduce`` callable instead).
"""

from gndpo.core.advantages import compute_advantages, distillation_reward, masked_moments, register_advantage
from gndpo.core.divergences import register_divergence, topk_divergence
from gndpo.core.logprobs import (
    TokenStats,
    hidden_logprobs,
    hidden_token_stats,
    masked_mean,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from gndpo.core.losses import aggregate_loss, compute_policy_loss, register_policy_loss

__all__ = [
    "TokenStats",
    "aggregate_loss",
    "compute_advantages",
    "compute_policy_loss",
    "distillation_reward",
    "hidden_logprobs",
    "hidden_token_stats",
    "masked_mean",
    "masked_moments",
    "register_advantage",
    "register_divergence",
    "register_policy_loss",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "topk_divergence",
]
