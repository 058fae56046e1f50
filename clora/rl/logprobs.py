"""Token log-probs and entropies from logits, aligned with the token convention of ``Datum``.

Index ``i`` of every result describes the prediction of ``tokens[i]`` from ``tokens[:i]``,
so it is computed from ``logits[:, i - 1]``; index 0 has no prediction and is 0.0.
"""

from __future__ import annotations

import torch

__all__ = ["token_logprobs", "token_entropy", "at_least_fp32"]


def at_least_fp32(values: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision values (bf16 logits under autocast); float64 stays float64."""
    return values if values.dtype == torch.float64 else values.float()


def _shift_right(values: torch.Tensor) -> torch.Tensor:
    """Put a zero column in front and drop the last: prediction of token i sits at index i."""
    # values: (B, T-1) -> (B, T)
    return torch.nn.functional.pad(values, (1, 0), value=0.0)  # (B, T)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, i] | tokens[:, :i]) for every position; position 0 is 0.0.

    Computed in float32 at least, whatever the logits' dtype (bf16 logits under autocast).
    """
    # logits: (B, T, V), tokens: (B, T) int64. The big logits tensor is never sliced (its slice
    # backward would allocate a full (B, T, V) zero tensor); the last position is dropped afterwards.
    logits = at_least_fp32(logits)  # (B, T, V), no copy when already fp32
    next_tokens = torch.nn.functional.pad(tokens[:, 1:], (0, 1)).unsqueeze(-1)  # (B, T, 1)
    picked = logits.gather(-1, next_tokens).squeeze(-1)  # (B, T)
    logp = picked - torch.logsumexp(logits, dim=-1)  # (B, T): position j predicts token j+1
    return _shift_right(logp[:, :-1])  # (B, T)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distribution that predicts each token; position 0 is 0.0."""
    # logits: (B, T, V)
    logp = torch.log_softmax(at_least_fp32(logits), dim=-1)  # (B, T, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T): position j's distribution predicts token j+1
    return _shift_right(entropy[:, :-1])  # (B, T)
