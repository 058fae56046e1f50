"""Policy losses per token, with token masks, and their normalisation.

Every function takes token-aligned (B, T) tensors: ``logp`` (trainer log-probs, with grad),
``sampler_logp`` (log-probs of the policy that sampled the tokens), ``advantages`` and
``mask`` (float weights, 1.0 for trained tokens, 0.0 for prompt/tool/pad tokens).
Results are 0.0 wherever ``mask`` is 0, and masked-out positions never produce NaN
gradients (the log ratio is zeroed there before ``exp``).

Normalisation (``LossConfig.normalize``) is split into a numerator and a denominator so a
batch can be processed in micro-batches and over several ForwardBackward calls:
``tokens``: sum of token losses / number of trained tokens (weights);
``sequences``: sum over sequences of (that sequence's mean token loss) / number of
sequences with at least one trained token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clora.config import LossConfig

__all__ = [
    "TokenLoss",
    "log_ratio",
    "importance_sampling_loss",
    "ppo_clip_loss",
    "cross_entropy_loss",
    "kl_k3",
    "token_loss",
    "loss_numerator",
    "loss_denominator",
    "masked_mean",
]


@dataclass(frozen=True)
class TokenLoss:
    per_token: torch.Tensor  # (B, T) loss of each token incl. KL penalty, 0 where masked out
    clipped: torch.Tensor  # (B, T) bool, True where the PPO clip was the active branch
    kl: torch.Tensor  # (B, T) k3 estimate of KL(sampler || trainer), 0 where masked out


def log_ratio(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_trainer / pi_sampler) per token, 0 where masked out (so exp() is 1 there)."""
    # logp, sampler_logp, mask: (B, T)
    return torch.where(mask > 0, logp - sampler_logp, torch.zeros_like(logp))  # (B, T)


def importance_sampling_loss(
    logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """-ratio * A with ratio = exp(logp - sampler_logp); its gradient is ratio * A * grad(logp)."""
    ratio = log_ratio(logp, sampler_logp, mask).exp()  # (B, T)
    return -(ratio * advantages) * mask  # (B, T)


def ppo_clip_loss(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) and where the clip is active."""
    ratio = log_ratio(logp, sampler_logp, mask).exp()  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    clipped = clipped_ratio * advantages  # (B, T)
    loss = -torch.minimum(unclipped, clipped) * mask  # (B, T)
    active = (clipped < unclipped) & (mask > 0)  # (B, T) bool
    return loss, active


def cross_entropy_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised negative log-likelihood of the masked-in tokens."""
    return -logp * mask  # (B, T)


def kl_k3(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(sampler || trainer) on tokens drawn from the sampler: r - 1 - log r,
    r = pi_trainer / pi_sampler. Non-negative, unbiased, 0 where masked out."""
    lr = log_ratio(logp, sampler_logp, mask)  # (B, T)
    return (lr.exp() - 1.0 - lr) * mask  # (B, T)


def token_loss(
    cfg: LossConfig,
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> TokenLoss:
    """The per-token loss of ``cfg.kind`` plus ``cfg.kl_coef`` * k3 KL (policy-gradient kinds only;
    cross-entropy data has no sampler policy to stay close to)."""
    kl = kl_k3(logp, sampler_logp, mask)  # (B, T)
    no_clip = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
    if cfg.kind == "cross_entropy":
        return TokenLoss(per_token=cross_entropy_loss(logp, mask), clipped=no_clip, kl=kl)
    if cfg.kind == "importance_sampling":
        per_token, clipped = importance_sampling_loss(logp, sampler_logp, advantages, mask), no_clip  # (B, T)
    elif cfg.kind == "ppo":
        per_token, clipped = ppo_clip_loss(
            logp, sampler_logp, advantages, mask, cfg.clip_low, cfg.clip_high
        )  # (B, T), (B, T)
    else:
        raise ValueError(f"unknown loss kind {cfg.kind!r}")
    if cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * kl  # (B, T)
    return TokenLoss(per_token=per_token, clipped=clipped, kl=kl)


def loss_numerator(per_token: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """The additive part of the normalised loss (sum over tokens, or over per-sequence means)."""
    # per_token, mask: (B, T); per_token is already 0 where masked out
    if normalize == "tokens":
        return per_token.sum()  # ()
    if normalize == "sequences":
        seq_weight = mask.sum(dim=1)  # (B,)
        seq_sum = per_token.sum(dim=1)  # (B,)
        return (seq_sum / seq_weight.clamp(min=1e-12)).sum()  # ()
    raise ValueError(f"unknown normalisation {normalize!r}; use 'tokens' or 'sequences'")


def loss_denominator(mask: torch.Tensor, normalize: str) -> float:
    """What ``loss_numerator`` is divided by: trained tokens, or sequences with a trained token."""
    # mask: (B, T)
    if normalize == "tokens":
        return float(mask.sum())
    if normalize == "sequences":
        return float((mask.sum(dim=1) > 0).sum())
    raise ValueError(f"unknown normalisation {normalize!r}; use 'tokens' or 'sequences'")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Token-weighted mean of ``values`` over the masked-in tokens (0.0 when nothing is masked in)."""
    # values, mask: (B, T)
    weight = float(mask.sum())
    return float((values * mask).sum()) / weight if weight > 0 else 0.0
