"""Scheduling tenants: priorities and weighted fair shares over the engine's LoRA slots and the trainer's
device (``policy``: the pure rule; ``gate``: its asyncio admission gate; ``yielding``: lower classes waiting
while a higher one is active). See docs/scheduling.md."""

from clora.sched.policy import (
    DECODE,
    PRIORITY_BACKGROUND,
    PRIORITY_INTERACTIVE,
    PRIORITY_NORMAL,
    TRAIN,
    YIELD_MODES,
    Scheduler,
    TenantPolicy,
)
from clora.sched.yielding import YieldGate

__all__ = ["DECODE", "PRIORITY_BACKGROUND", "PRIORITY_INTERACTIVE", "PRIORITY_NORMAL", "Scheduler", "TRAIN",
           "TenantPolicy", "YIELD_MODES", "YieldGate"]
