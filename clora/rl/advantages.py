"""Group-relative advantages (GRPO): each sample's reward against its group's statistics."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["AdvantageKind", "group_advantages"]

AdvantageKind = Literal["grpo", "grpo_no_std"]


def group_advantages(rewards: torch.Tensor, kind: AdvantageKind = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Advantages for ``rewards`` of shape (num_groups, group_size), one group per prompt.

    ``grpo``: (r - mean) / (std + eps), with the population std (correction 0) so a group of
    one is defined (advantage 0). ``grpo_no_std``: r - mean (Dr. GRPO / tinker-cookbook style).
    A group whose rewards are all equal gets advantage 0 in both kinds.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_groups, group_size), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()  # (N, G)
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (N, G)
    if kind == "grpo_no_std":
        return centred  # (N, G)
    if kind == "grpo":
        std = rewards.std(dim=1, keepdim=True, correction=0)  # (N, 1)
        return centred / (std + eps)  # (N, G)
    raise ValueError(f"unknown advantage kind {kind!r}; use 'grpo' or 'grpo_no_std'")
