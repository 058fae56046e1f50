"""A LoRA linear layer that keeps the base weight frozen and never merges.

``LoRALinear`` wraps one ``nn.Linear`` and holds *slots*: each slot is one adapter's
(A, B, scaling), and slots in one layer may have different ranks. A ``SlotRouting`` object,
shared by every LoRALinear of a model, says which slot each batch row uses: one slot for
the whole batch (the trainer's current tenant), or a (B,) index tensor for a mixed batch
(-1 = base model only), used by fused multi-tenant training.

Mixed batches have two implementations (``SlotRouting.mode``), with the same result:
``"grouped"`` (default) splits the batch into runs of consecutive rows with the same slot and
runs each slot's own A/B on its rows (no padding, no gather; one ``cat`` joins the deltas);
``"gathered"`` pads every slot to the largest rank and gathers A/B per row for two ``bmm``.
On CPU grouped is the faster one (see docs/trainer.md); put a tenant's rows next to each other.

The slot tensors are not registered parameters of the module: the caller owns them (the
trainer binds a tenant's working copy before a step and unbinds it after), so the model's
``state_dict`` stays the base model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["RowMode", "LoRASlot", "SlotRouting", "LoRALinear"]


@dataclass(frozen=True)
class LoRASlot:
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scaling: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.a.shape[0]


RowMode = Literal["grouped", "gathered"]


class SlotRouting:
    """Which LoRA slot each row of the next forward uses; shared by all layers of one model."""

    def __init__(self, mode: RowMode = "grouped") -> None:
        if mode not in ("grouped", "gathered"):
            raise ValueError(f"unknown row routing mode {mode!r}; use 'grouped' or 'gathered'")
        self.mode: RowMode = mode
        self.active: int | None = None  # every row uses this slot (None: base model only)
        self.row_slots: torch.Tensor | None = None  # (B,) int64 slot per row, -1 = base only
        self.runs: list[tuple[int, int, int]] = []  # (slot, start, stop) runs of equal consecutive slots

    def use_slot(self, slot: int | None) -> None:
        self.active, self.row_slots, self.runs = slot, None, []

    def use_rows(self, row_slots: torch.Tensor) -> None:
        # row_slots: (B,) int64
        if row_slots.dim() != 1:
            raise ValueError(f"row_slots must be (B,), got shape {tuple(row_slots.shape)}")
        self.active, self.row_slots = None, row_slots.to(torch.int64)
        self.runs = _runs(self.row_slots.tolist())

    def clear(self) -> None:
        self.active, self.row_slots, self.runs = None, None, []

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """Inside the block no row uses any slot: the model is the plain base model. The routing
        before the block is restored after it (bound slots are not touched)."""
        saved = self.active, self.row_slots, self.runs
        self.clear()
        try:
            yield
        finally:
            self.active, self.row_slots, self.runs = saved


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Run-length encoding: [0, 0, 1, -1, -1] -> [(0, 0, 2), (1, 2, 3), (-1, 3, 5)]."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], i + 1)
        else:
            runs.append((slot, i, i + 1))
    return runs


class LoRALinear(nn.Module):
    """y = base(x) + B(A(x)) * scaling for the slot routed to each row; the base stays frozen."""

    def __init__(self, base: nn.Linear, routing: SlotRouting) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base_layer = base
        self.routing = routing
        self.slots: list[LoRASlot | None] = []

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def set_slot(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise ValueError(
                f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} linear layer"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA rank mismatch: A has rank {a.shape[0]}, B has rank {b.shape[1]}")
        while len(self.slots) <= index:
            self.slots.append(None)
        self.slots[index] = LoRASlot(a=a, b=b, scaling=scaling)

    def clear_slot(self, index: int) -> None:
        if index < len(self.slots):
            self.slots[index] = None

    def _slot(self, index: int) -> LoRASlot | None:
        return self.slots[index] if 0 <= index < len(self.slots) else None

    @staticmethod
    def _delta(x: torch.Tensor, slot: LoRASlot) -> torch.Tensor:
        # x: (..., in) -> (..., out); same op order as peft: lora_B(lora_A(x)) * scaling
        return nn.functional.linear(nn.functional.linear(x, slot.a), slot.b) * slot.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) or (N, in)
        result = self.base_layer(x)  # (..., out)
        routing = self.routing
        if routing.active is not None:
            slot = self._slot(routing.active)
            if slot is not None:
                result = result + self._delta(x, slot)  # (..., out)
            return result
        if routing.row_slots is None:
            return result
        if routing.row_slots.shape[0] != x.shape[0]:
            raise ValueError(f"row_slots has {routing.row_slots.shape[0]} rows, input has {x.shape[0]}")
        if routing.mode == "gathered":
            return result + self._gathered_delta(x, routing.row_slots).to(result.dtype)  # (B, ..., out)
        return self._grouped(x, result, routing.runs)

    def _grouped(self, x: torch.Tensor, result: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Each run of consecutive rows gets its own slot's delta; the deltas are joined by one cat.

        ``split`` and ``cat`` have single-node backwards; slicing ``x`` or ``result`` per run would
        make each run's backward allocate a full-batch zero tensor (K x the work).
        """
        # x: (B, ..., in), result: (B, ..., out)
        deltas = []
        for (index, start, stop), rows in zip(runs, x.split([stop - start for _, start, stop in runs]), strict=True):
            slot = self._slot(index)
            if slot is None:  # base rows (-1) and tenants that do not target this module
                deltas.append(result.new_zeros((stop - start, *result.shape[1:])))  # (R, ..., out)
            else:
                deltas.append(self._delta(rows, slot).to(result.dtype))  # (R, ..., out)
        return result + (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=0))  # (B, ..., out)

    def _gathered_delta(self, x: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """Every slot zero-padded to the largest rank, A/B gathered per row, two batched matmuls."""
        # x: (B, ..., in), row_slots: (B,)
        ranks = [s.rank for s in self.slots if s is not None]
        if not ranks:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        r_max = max(ranks)
        none = len(self.slots)  # index of an all-zero slot for base rows and unbound slots
        a_parts = [x.new_zeros(r_max, self.in_features)] * (none + 1)  # (r_max, in) each
        b_parts = [x.new_zeros(self.out_features, r_max)] * (none + 1)  # (out, r_max) each
        for i, slot in enumerate(self.slots):
            if slot is not None:
                pad = r_max - slot.rank
                a_parts[i] = nn.functional.pad(slot.a, (0, 0, 0, pad))  # (r_max, in)
                b_parts[i] = nn.functional.pad(slot.b * slot.scaling, (0, pad))  # (out, r_max)
        bound = [s is not None for s in self.slots]
        index = torch.tensor(
            [i if 0 <= i < none and bound[i] else none for i in row_slots.tolist()], device=x.device
        )  # (B,)
        a_rows = torch.stack(a_parts)[index]  # (B, r_max, in)
        b_rows = torch.stack(b_parts)[index]  # (B, out, r_max)
        rows = x.reshape(x.shape[0], -1, self.in_features)  # (B, L, in)
        hidden = torch.bmm(rows, a_rows.transpose(1, 2))  # (B, L, r_max)
        delta = torch.bmm(hidden, b_rows.transpose(1, 2))  # (B, L, out)
        return delta.reshape(*x.shape[:-1], self.out_features)  # (B, ..., out)

    def extra_repr(self) -> str:
        ranks = [s.rank if s is not None else None for s in self.slots]
        return f"in={self.in_features}, out={self.out_features}, slot_ranks={ranks}"
