"""A LoRA linear layer that keeps the base weight frozen and never merges.

``LoRALinear`` wraps one ``nn.Linear`` and holds *slots*: each slot is one adapter's
(A, B, scaling), and slots in one layer may have different ranks. A ``SlotRouting`` object,
shared by every LoRALinear of a model, says which slot each batch row uses: one slot for
the whole batch (the trainer's current tenant), or a (B,) index tensor for a mixed batch
(-1 = base model only), the hook for fused multi-tenant training.

The slot tensors are not registered parameters of the module: the caller owns them (the
trainer binds a tenant's working copy before a step and unbinds it after), so the model's
``state_dict`` stays the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoRASlot", "SlotRouting", "LoRALinear"]


@dataclass(frozen=True)
class LoRASlot:
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scaling: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class SlotRouting:
    """Which LoRA slot each row of the next forward uses; shared by all layers of one model."""

    def __init__(self) -> None:
        self.active: int | None = None  # every row uses this slot (None: base model only)
        self.row_slots: torch.Tensor | None = None  # (B,) int64 slot per row, -1 = base only

    def use_slot(self, slot: int | None) -> None:
        self.active, self.row_slots = slot, None

    def use_rows(self, row_slots: torch.Tensor) -> None:
        # row_slots: (B,) int64
        if row_slots.dim() != 1:
            raise ValueError(f"row_slots must be (B,), got shape {tuple(row_slots.shape)}")
        self.active, self.row_slots = None, row_slots.to(torch.int64)

    def clear(self) -> None:
        self.active, self.row_slots = None, None


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
        row_slots = routing.row_slots.to(x.device)  # (B,)
        if row_slots.shape[0] != x.shape[0]:
            raise ValueError(f"row_slots has {row_slots.shape[0]} rows, input has {x.shape[0]}")
        for index in torch.unique(row_slots).tolist():
            slot = self._slot(index)
            if slot is None:
                continue  # base rows (-1) and tenants that do not target this module
            rows = (row_slots == index).nonzero().squeeze(1)  # (R,)
            delta = self._delta(x.index_select(0, rows), slot)  # (R, ..., out)
            result = result.index_add(0, rows, delta.to(result.dtype))  # (B, ..., out)
        return result

    def extra_repr(self) -> str:
        ranks = [s.rank if s is not None else None for s in self.slots]
        return f"in={self.in_features}, out={self.out_features}, slot_ranks={ranks}"
