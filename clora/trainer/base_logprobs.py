"""Base-model log-probs for the KL penalty, from the trainer's own model with the adapters routed off.

A LoRA runtime needs no reference copy of the model: with no slot routed, every LoRALinear returns
its frozen base layer's output, so the trainer's weights give pi_base. ``base_logprobs`` runs that
forward under ``torch.no_grad`` on the micro-batches a training step cuts from the same data (the
same shapes, so a fused and a single-tenant step see the same values), through the trainer's own
forward path (clora.trainer.prefix_call): with shared prefixes on, each prefix the data share is
computed once and the LM head runs only at trained positions, the only ones the KL terms read.
The trainer calls it only when ``LossConfig.kl_coef > 0``; the KL math itself is in clora.rl.losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clora.messages import Datum
from clora.rl import collate, kl_k1_mean, micro_batches
from clora.trainer.prefix_call import CallForward

if TYPE_CHECKING:
    from clora.trainer.core import TrainerCore

__all__ = ["BaseLogprobs", "base_logprobs"]


@dataclass(frozen=True)
class BaseLogprobs:
    """The base model's log-prob of every token of each datum of one training call."""

    rows: list[torch.Tensor]  # per datum: (n,) on the trainer's device, at least fp32; index 0 and, on the
    # shared-prefix path, every position outside the loss mask are 0.0
    k1_mean: float  # mean of log pi_sampler - log pi_base over the trained tokens (the "k1" baseline)

    def batch(self, indices: Sequence[int], width: int) -> torch.Tensor:
        """The rows of data ``indices``, right-padded with 0.0 to ``width``: aligned with a collated batch."""
        rows = [self.rows[i] for i in indices]
        out = rows[0].new_zeros((len(rows), width))  # (B, T)
        for r, row in enumerate(rows):
            out[r, : row.shape[0]] = row
        return out


def base_logprobs(core: TrainerCore, data: Sequence[Datum]) -> BaseLogprobs:
    """log pi_base of the trained tokens of ``data`` (no grad, adapters routed off), micro-batch by micro-batch."""
    rows: list[torch.Tensor] = []
    k1_sum = weight = 0.0
    batches = [collate(chunk, core.pad_token_id) for chunk in micro_batches(data, core.micro_batch_size)]
    with torch.no_grad(), core.routing.base_only():
        forward = CallForward(core, [d.tokens for d in data], [len(b.lengths) for b in batches], grad=False)
        for index, cpu in enumerate(batches):
            batch = cpu.to(core.device)
            logp = forward.forward(index, cpu, batch, cpu.loss_mask != 0).logp  # (B, T)
            forward.done(index)
            rows.extend(logp[i, :n] for i, n in enumerate(batch.lengths))
            part_sum, part_weight = kl_k1_mean(batch.sampler_logprobs, logp, batch.loss_mask)
            k1_sum, weight = k1_sum + part_sum, weight + part_weight
    return BaseLogprobs(rows=rows, k1_mean=k1_sum / weight if weight > 0 else 0.0)
