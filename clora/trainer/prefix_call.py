"""The policy forward of one trainer call, micro-batch by micro-batch, on the path the trainer is set to.

Every call that needs log-probs goes through ``CallForward``: TrainStep / ForwardBackward
(clora.trainer.core), the fused multi-tenant step (clora.trainer.fused), ComputeLogprobs, and the
base-model forward of the KL penalty (clora.trainer.base_logprobs). With ``core.shared_prefix`` on
it is a ``PrefixRunner`` over the call's rows (prefixes shared by its rows computed once per call,
LM head only where a log-prob is needed; clora.trainer.prefix); off, ``naive_forward`` per
micro-batch (every position through the whole model and the LM head: the reference).

Per micro-batch ``i``: ``forward(i, cpu, batch, need)``, the caller's backward, then ``done(i)``
(after the call's last micro-batch the gradient goes back through the shared prefixes). Counts per
LoRA slot: ``positions`` (token positions through the trunk, padding included, each shared prefix
once; complete after the last ``done``) and ``logit_positions`` (positions through the LM head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from clora.rl import TokenBatch
from clora.trainer.prefix import PolicyForward, PrefixRunner, naive_forward

if TYPE_CHECKING:
    from clora.trainer.core import TrainerCore

__all__ = ["CallForward", "PREFIX_MIN_TOKENS"]

PREFIX_MIN_TOKENS = 8  # shortest token run computed once for the rows that share it (clora.trainer.prefix_plan)
_SLOT = 0  # the slot a call without per-row slots counts its positions under


class CallForward:
    """The policy forward of one call's micro-batches (consecutive ``chunk_sizes`` rows of ``rows``).

    ``slots``: each row's LoRA slot, and every forward is routed row by row to them (fused steps);
    None: the caller's routing applies to every row (one bound slot, or ``routing.base_only()``).
    ``grad``: the log-probs carry gradients (training); False under ``torch.no_grad``.
    """

    def __init__(
        self,
        core: TrainerCore,
        rows: Sequence[Sequence[int]],
        chunk_sizes: Sequence[int],
        *,
        grad: bool,
        slots: Sequence[int] | None = None,
    ) -> None:
        self.core = core
        self.routed = slots is not None
        self.slots = list(slots) if slots is not None else [_SLOT] * len(rows)
        self.starts = [sum(chunk_sizes[:i]) for i in range(len(chunk_sizes))]
        self.positions: dict[int, int] = {}
        self.logit_positions: dict[int, int] = {}
        self.runner: PrefixRunner | None = None
        if core.shared_prefix:
            # Prefixes shared across micro-batches run once per call when their positions fit half the
            # positions of the naive path's largest micro-batch, so prefix activations plus one
            # micro-batch stay below a naive micro-batch with its full logits (docs/trainer.md).
            longest = max(len(r) for r in rows)
            self.runner = PrefixRunner(
                core.model, rows, self.slots, chunk_sizes, budget=core.micro_batch_size * longest // 2,
                device=core.device, pad_id=core.pad_token_id, autocast=core.autocast_bf16,
                routing=core.routing if self.routed else None, min_tokens=core.prefix_min_tokens, grad=grad,
            )

    def forward(self, index: int, cpu: TokenBatch, batch: TokenBatch, need: torch.Tensor) -> PolicyForward:
        """Log-probs (B, T) of micro-batch ``index`` (``cpu``, and ``batch``: its copy on the device)
        where ``need`` (B, T) bool on the cpu is True; the naive path computes them everywhere."""
        if self.runner is not None:
            out = self.runner.forward(index, need)
        else:
            row_slots = self.slots[self.starts[index] : self.starts[index] + len(cpu.lengths)]
            if self.routed:
                self.core.routing.use_rows(torch.tensor(row_slots))
            out = naive_forward(
                self.core.model, batch.tokens, batch.attention_mask, autocast=self.core.autocast_bf16,
                slots=row_slots,
            )
        _add(self.positions, out.positions)
        _add(self.logit_positions, out.logit_positions)
        return out

    def done(self, index: int) -> None:
        """Micro-batch ``index``'s backward (if any) is done; after the last one of a span of
        micro-batches that share prefixes, the backward through those prefixes runs here."""
        if self.runner is not None:
            before = dict(self.runner.positions)
            self.runner.done(index)
            _add(self.positions, {s: n - before.get(s, 0) for s, n in self.runner.positions.items()})


def _add(into: dict[int, int], counts: dict[int, int]) -> None:
    for slot, n in counts.items():
        into[slot] = into.get(slot, 0) + n
