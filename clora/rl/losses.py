"""Policy losses per token, with token masks, their normalisation, and the KL penalty to the base model.

Every function takes token-aligned (B, T) tensors: ``logp`` (trainer log-probs, with grad),
``sampler_logp`` (log-probs of the policy that sampled the tokens), ``base_logp`` (the base
model's, no grad), ``advantages`` and ``mask`` (float weights, 1.0 for trained tokens, 0.0 for
prompt/tool/pad tokens). Results are 0.0 wherever ``mask`` is 0, and masked-out positions never
produce NaN gradients (log ratios are zeroed there before ``exp``). The kinds, normalisations
and KL estimators are defined in ``LossConfig``'s docstring (docs/configuration.md).

Normalisation (``LossConfig.normalize``) is split into a numerator and a denominator so a
batch can be processed in micro-batches and over several ForwardBackward calls:
``tokens``: sum of token losses / number of trained tokens (weights);
``sequences``: sum over sequences of (that sequence's mean token loss) / number of
sequences with at least one trained token;
``constant``: sum of token losses / (number of sequences * ``normalize_constant``).
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
    "cispo_loss",
    "cross_entropy_loss",
    "kl_k1",
    "kl_k3",
    "kl_k1_mean",
    "token_loss",
    "loss_numerator",
    "loss_denominator",
    "loss_metrics",
    "masked_mean",
]


@dataclass(frozen=True)
class TokenLoss:
    per_token: torch.Tensor  # (B, T) loss of each token incl. KL penalty, 0 where masked out
    clipped: torch.Tensor  # (B, T) bool, True where the PPO / CISPO clip was active
    kl: torch.Tensor  # (B, T) estimate of KL(trainer || base) by cfg.kl_estimator; 0 if masked out or no penalty
    kl_sampler: torch.Tensor  # (B, T) k3 estimate of KL(sampler || trainer), 0 where masked out
    ratio: torch.Tensor  # (B, T) importance ratio pi_trainer / pi_sampler, no grad; 1 where masked out


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


def cispo_loss(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * logp and where the clip is active.

    The clipped ratio is a constant weight, so every token keeps the gradient -weight * A * grad(logp).
    """
    ratio = log_ratio(logp, sampler_logp, mask).exp().detach()  # (B, T)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T), no grad
    trained_logp = torch.where(mask > 0, logp, torch.zeros_like(logp))  # (B, T)
    loss = -(weight * advantages * trained_logp) * mask  # (B, T)
    active = (weight != ratio) & (mask > 0)  # (B, T) bool
    return loss, active


def cross_entropy_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised negative log-likelihood of the masked-in tokens."""
    return -logp * mask  # (B, T)


def kl_k1(logp_q: torch.Tensor, logp_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(q || p) on tokens drawn from q: log q - log p. Unbiased, can be negative."""
    return log_ratio(logp_q, logp_p, mask)  # (B, T)


def kl_k3(logp_p: torch.Tensor, logp_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(q || p) on tokens drawn from q: r - 1 - log r, r = p / q.
    Non-negative, unbiased, 0 where masked out. Gradients flow through both arguments."""
    lr = log_ratio(logp_p, logp_q, mask)  # (B, T)
    return (lr.exp() - 1.0 - lr) * mask  # (B, T)


def kl_k1_mean(sampler_logp: torch.Tensor, base_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum, weight) of the k1 estimate log pi_sampler - log pi_base over the trained tokens, so a
    caller adds them over micro-batches and divides: the baseline of the "k1" advantage shaping."""
    return float((kl_k1(sampler_logp, base_logp, mask) * mask).sum()), float(mask.sum())


def token_loss(
    cfg: LossConfig,
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    base_logp: torch.Tensor | None = None,
    kl_baseline: float = 0.0,
) -> TokenLoss:
    """The per-token loss of ``cfg.kind`` with the KL penalty of ``cfg.kl_coef`` to the base model.

    ``base_logp`` is required when ``cfg.kl_coef > 0``; ``kl_baseline`` is the mean k1 estimate
    over the whole call (``kl_k1_mean``), subtracted by the "k1" advantage shaping.
    """
    kl_sampler = kl_k3(logp, sampler_logp, mask)  # (B, T) KL(sampler || trainer)
    ratio = log_ratio(logp.detach(), sampler_logp, mask).exp()  # (B, T), no grad
    no_clip = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
    kl = torch.zeros_like(mask)  # (B, T)
    if cfg.kind == "cross_entropy":
        return TokenLoss(per_token=cross_entropy_loss(logp, mask), clipped=no_clip, kl=kl, kl_sampler=kl_sampler,
                         ratio=ratio)
    if cfg.kl_coef > 0:
        if base_logp is None:
            raise ValueError("kl_coef > 0 needs the base model's log-probs (base_logp)")
        if cfg.kl_estimator == "k1":  # a per-token reward -kl_coef * k1, centred: shapes the advantages
            kl = kl_k1(sampler_logp, base_logp, mask)  # (B, T), data: no grad
            advantages = advantages + cfg.kl_coef * (kl_baseline - kl) * mask  # (B, T)
        elif cfg.kl_estimator == "k3":
            kl = kl_k3(base_logp, logp, mask)  # (B, T) KL(trainer || base), with grad through logp
        else:
            raise ValueError(f"unknown kl_estimator {cfg.kl_estimator!r}; use 'k3' or 'k1'")
    if cfg.kind == "importance_sampling":
        per_token, clipped = importance_sampling_loss(logp, sampler_logp, advantages, mask), no_clip  # (B, T)
    elif cfg.kind == "ppo":
        per_token, clipped = ppo_clip_loss(
            logp, sampler_logp, advantages, mask, cfg.clip_low, cfg.clip_high
        )  # (B, T), (B, T)
    elif cfg.kind == "cispo":
        per_token, clipped = cispo_loss(
            logp, sampler_logp, advantages, mask, cfg.clip_low, cfg.clip_high
        )  # (B, T), (B, T)
    else:
        raise ValueError(f"unknown loss kind {cfg.kind!r}")
    if cfg.kl_coef > 0 and cfg.kl_estimator == "k3":
        per_token = per_token + cfg.kl_coef * kl  # (B, T)
    return TokenLoss(per_token=per_token, clipped=clipped, kl=kl, kl_sampler=kl_sampler, ratio=ratio)


_NORMALIZE = "use 'tokens', 'sequences' or 'constant'"


def loss_numerator(per_token: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """The additive part of the normalised loss (sum over tokens, or over per-sequence means)."""
    # per_token, mask: (B, T); per_token is already 0 where masked out
    if normalize in ("tokens", "constant"):
        return per_token.sum()  # ()
    if normalize == "sequences":
        seq_weight = mask.sum(dim=1)  # (B,)
        seq_sum = per_token.sum(dim=1)  # (B,)
        return (seq_sum / seq_weight.clamp(min=1e-12)).sum()  # ()
    raise ValueError(f"unknown normalisation {normalize!r}; {_NORMALIZE}")


def loss_denominator(mask: torch.Tensor, normalize: str, constant: float | None = None) -> float:
    """What ``loss_numerator`` is divided by: trained tokens, sequences with a trained token, or
    sequences (every row, trained or not) times ``constant``."""
    # mask: (B, T)
    if normalize == "tokens":
        return float(mask.sum())
    if normalize == "sequences":
        return float((mask.sum(dim=1) > 0).sum())
    if normalize == "constant":
        if constant is None or not constant > 0:
            raise ValueError(f"normalize='constant' needs a constant > 0, got {constant!r}")
        return float(mask.shape[0]) * constant
    raise ValueError(f"unknown normalisation {normalize!r}; {_NORMALIZE}")


def loss_metrics(sums: dict[str, float], tokens: float, sequences: int, cfg: LossConfig) -> dict[str, float]:
    """A training call's loss metrics from its sums over trained tokens ("loss" is already
    normalised): ``kl`` (to the base model) only when the penalty is on, ``kl_sampler`` always, and
    ``ratio_mean`` (the mean importance ratio pi_trainer / pi_sampler over trained tokens: 1 on-policy,
    off-policy data drift from it) when ``sums`` has a "ratio" sum."""
    per_token = lambda s: s / tokens if tokens > 0 else 0.0  # noqa: E731
    metrics = {
        "loss": sums["loss"],
        "kl_sampler": per_token(sums["kl_sampler"]),
        "entropy": per_token(sums["entropy"]),
        "clip_frac": per_token(sums["clip_frac"]),
        "tokens": tokens,
        "sequences": float(sequences),
    }
    if cfg.kl_coef > 0:
        metrics["kl"] = per_token(sums["kl"])
    if "ratio" in sums:
        metrics["ratio_mean"] = per_token(sums["ratio"])
    return metrics


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Token-weighted mean of ``values`` over the masked-in tokens (0.0 when nothing is masked in)."""
    # values, mask: (B, T)
    weight = float(mask.sum())
    return float((values * mask).sum()) / weight if weight > 0 else 0.0
