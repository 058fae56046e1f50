"""Event names the observe tools read, in one place.

The runtime's names come from ``clora.events``. The trainer's and the sampler's are repeated here
as plain strings because importing ``clora.trainer.actor`` or ``clora.sampler.actor`` pulls in torch and vLLM,
and ``clora events`` must stay fast; ``tests/test_observe_names.py`` checks they are the same.
"""

from __future__ import annotations

from typing import Final

from clora.events import (
    ADAPTER_PUBLISHED,
    PUBLISH_FAILED,
    RUNTIME_STARTED,
    TENANT_EVAL,
    TENANT_FAILED,
    TENANT_FINISHED,
    TENANT_STARTED,
    TENANT_STEP,
    TENANT_STEP_SKIPPED,
)

__all__ = [
    "RUNTIME_STARTED",
    "TENANT_STARTED",
    "TENANT_STEP",
    "TENANT_STEP_SKIPPED",
    "TENANT_EVAL",
    "TENANT_FINISHED",
    "TENANT_FAILED",
    "ADAPTER_PUBLISHED",
    "PUBLISH_FAILED",
    "TRAINER_STEP",
    "TRAINER_FORWARD_BACKWARD",
    "TRAINER_STEP_REJECTED",
    "TRAINER_EXPORTED",
    "SAMPLE_DONE",
    "TRAINER_WORK",
]

TRAINER_STEP: Final = "trainer.step"  # clora.trainer.actor.TRAINER_STEP
TRAINER_FORWARD_BACKWARD: Final = "trainer.forward_backward"  # clora.trainer.actor.TRAINER_FORWARD_BACKWARD
TRAINER_STEP_REJECTED: Final = "trainer.step_rejected"  # clora.trainer.actor.TRAINER_STEP_REJECTED
TRAINER_EXPORTED: Final = "trainer.exported"  # clora.trainer.actor.TRAINER_EXPORTED
SAMPLE_DONE: Final = "sampler.sample_done"  # clora.sampler.actor.SAMPLE_DONE

TRAINER_WORK: Final = (TRAINER_STEP, TRAINER_FORWARD_BACKWARD, TRAINER_EXPORTED)
"""Trainer events whose ``duration_s`` is time the device was busy for one tenant."""
