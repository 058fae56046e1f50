"""Pure RL math on torch tensors: token log-probs, advantages, policy losses, batching.

No actor imports; everything here is synchronous and side-effect free.
"""

from clora.rl.advantages import AdvantageKind, group_advantages
from clora.rl.batch import TokenBatch, check_datum, collate, micro_batches
from clora.rl.logprobs import token_entropy, token_logprobs
from clora.rl.losses import (
    TokenLoss,
    cispo_loss,
    cross_entropy_loss,
    importance_sampling_loss,
    kl_k1,
    kl_k1_mean,
    kl_k3,
    log_ratio,
    loss_denominator,
    loss_metrics,
    loss_numerator,
    masked_mean,
    ppo_clip_loss,
    token_loss,
)

__all__ = [
    "AdvantageKind",
    "group_advantages",
    "TokenBatch",
    "check_datum",
    "collate",
    "micro_batches",
    "token_entropy",
    "token_logprobs",
    "TokenLoss",
    "cispo_loss",
    "cross_entropy_loss",
    "importance_sampling_loss",
    "kl_k1",
    "kl_k1_mean",
    "kl_k3",
    "log_ratio",
    "loss_denominator",
    "loss_metrics",
    "loss_numerator",
    "masked_mean",
    "ppo_clip_loss",
    "token_loss",
]
