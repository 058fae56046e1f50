"""Learning-rate schedules: the LR of one tenant's optimizer step, from its own step count.

Pure and stateless: the LR of a step depends only on the tenant's OptimConfig and how many
optimizer steps it took since its Adam moments were last reset (``AdapterStore.adam_step``), so
tenants with different schedules share one trainer, and a restored checkpoint continues its
schedule where it left off. The formulas are in ``OptimConfig``'s docstring (docs/configuration.md).
"""

from __future__ import annotations

import math

from clora.config import OptimConfig
from clora.errors import ConfigError

__all__ = ["check_schedule", "scheduled_lr"]


def check_schedule(optim: OptimConfig, owner: str) -> None:
    """A decaying schedule needs the number of steps it spans: ConfigError naming the field if unset."""
    if optim.lr_schedule != "constant" and optim.total_steps is None:
        raise ConfigError(
            f"{owner}: optim.total_steps: lr_schedule {optim.lr_schedule!r} decays over total_steps optimizer "
            "steps, so it must be set (an experiment uses its steps; or use lr_schedule 'constant')"
        )


def scheduled_lr(optim: OptimConfig, step_index: int) -> float:
    """The learning rate of optimizer step ``step_index`` (0 for the first step after a reset)."""
    if step_index < 0:
        raise ValueError(f"step_index must be >= 0, got {step_index}")
    warmup = optim.warmup_steps
    if step_index < warmup:
        return optim.lr * (step_index + 1) / warmup
    if optim.lr_schedule == "constant":
        return optim.lr
    check_schedule(optim, "scheduled_lr")
    assert optim.total_steps is not None
    span = optim.total_steps - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step_index - warmup) / span)
    floor = optim.min_lr_ratio * optim.lr
    if optim.lr_schedule == "linear":
        return floor + (optim.lr - floor) * (1.0 - progress)
    if optim.lr_schedule == "cosine":
        return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {optim.lr_schedule!r}; use 'constant', 'linear' or 'cosine'")
