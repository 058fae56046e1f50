"""Turn ``Datum`` lists into padded (B, T) tensors and split them into micro-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from clora.errors import ConfigError
from clora.messages import Datum

__all__ = ["TokenBatch", "collate", "micro_batches", "check_datum"]


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded sequences; every tensor is (B, T) and token-aligned (see clora.messages)."""

    tokens: torch.Tensor  # (B, T) int64, pad positions hold ``pad_id``
    attention_mask: torch.Tensor  # (B, T) int64, 1 for real tokens
    loss_mask: torch.Tensor  # (B, T) float32, 0 on padding
    advantages: torch.Tensor  # (B, T) float32
    sampler_logprobs: torch.Tensor  # (B, T) float32
    lengths: tuple[int, ...]  # real length of each row

    def to(self, device: torch.device) -> TokenBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return TokenBatch(
            tokens=move(self.tokens),
            attention_mask=move(self.attention_mask),
            loss_mask=move(self.loss_mask),
            advantages=move(self.advantages),
            sampler_logprobs=move(self.sampler_logprobs),
            lengths=self.lengths,
        )


def check_datum(index: int, datum: Datum) -> None:
    """Every token-aligned list must have one entry per token, and index 0 is never trained."""
    n = len(datum.tokens)
    if n < 2:
        raise ConfigError(f"datum {index}: needs at least 2 tokens, got {n}")
    for field in ("loss_mask", "advantages", "sampler_logprobs"):
        got = len(getattr(datum, field))
        if got != n:
            raise ConfigError(f"datum {index}: {field} has {got} entries but tokens has {n}")
    if datum.loss_mask[0] != 0.0:
        raise ConfigError(f"datum {index}: loss_mask[0] must be 0.0 (token 0 has no prediction)")


def collate(data: Sequence[Datum], pad_id: int = 0) -> TokenBatch:
    """Right-pad ``data`` to its longest sequence."""
    if not data:
        raise ConfigError("no data: a batch needs at least one datum")
    for i, d in enumerate(data):
        check_datum(i, d)
    lengths = tuple(len(d.tokens) for d in data)
    b, t = len(data), max(lengths)
    tokens = torch.full((b, t), pad_id, dtype=torch.int64)  # (B, T)
    attention = torch.zeros((b, t), dtype=torch.int64)  # (B, T)
    floats = torch.zeros((3, b, t), dtype=torch.float32)  # (3, B, T): loss_mask, advantages, sampler_logprobs
    for row, d in enumerate(data):
        n = lengths[row]
        tokens[row, :n] = torch.tensor(d.tokens, dtype=torch.int64)  # (n,)
        attention[row, :n] = 1
        floats[:, row, :n] = torch.tensor(
            [d.loss_mask, d.advantages, d.sampler_logprobs], dtype=torch.float32
        )  # (3, n)
    return TokenBatch(
        tokens=tokens,
        attention_mask=attention,
        loss_mask=floats[0],
        advantages=floats[1],
        sampler_logprobs=floats[2],
        lengths=lengths,
    )


def micro_batches(data: Sequence[Datum], size: int) -> Iterator[Sequence[Datum]]:
    """Consecutive chunks of at most ``size`` data, in order."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    for start in range(0, len(data), size):
        yield data[start : start + size]
