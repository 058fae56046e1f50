"""Scheduling tenants: priorities and weighted fair shares over the engine's LoRA slots and the trainer's
device (``policy``: the pure rule; ``gate``: its asyncio admission gate). See docs/scheduling.md."""

from clora.sched.policy import (
    PRIORITY_BACKGROUND,
    PRIORITY_INTERACTIVE,
    PRIORITY_NORMAL,
    Scheduler,
    TenantPolicy,
)

__all__ = ["PRIORITY_BACKGROUND", "PRIORITY_INTERACTIVE", "PRIORITY_NORMAL", "Scheduler", "TenantPolicy"]
