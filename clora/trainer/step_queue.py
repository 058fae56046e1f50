"""Which pending TrainSteps run next, and together: the trainer's step queue.

Every TrainStep the TrainerActor receives waits here until the device is free. The next group is
up to ``fuse_max`` tenants with pending steps, in the order the runtime's ``Scheduler`` decides
(strict priority between classes, weighted fair share of device-seconds within one, aging against
starvation: clora.sched.policy), each with its oldest pending step (a tenant's later step waits for
the next group, so each tenant's steps stay in order). With ``fuse_max`` = 1 that is one step at a
time; with more, steps that piled up while the device was busy share one fused forward/backward
(``train_group``). So fusion happens exactly when steps pile up, and costs nothing when they do
not. A group's device time is charged to its tenants in proportion to their tokens (``charge``).
A tenant that must yield to a higher class (``Scheduler.yields_to``: under ``yield_to_higher =
"device"``, while a higher class decodes or trains) is left out of every group; its steps' handlers
wait in ``ready`` (woken by the scheduler's changes and timers, no polling). Its hold opens when it is
first held back and closes when its step is taken, so an aged hold stays aged until then.

``train_group`` is the device job of one group (it runs in the trainer's worker thread): one
request runs the single-adapter path, several the fused one, then each trained tenant gets the
copies its TrainStep asked for. Outcomes are per request: a request's own error never touches the
others.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clora.sched import TRAIN, Scheduler, YieldGate
from clora.messages import AdapterSnapshot, StoreState, TrainStep, TrainStepResult
from clora.trainer.core import TrainerCore
from clora.trainer.fused import FusedRequest

__all__ = ["GroupOutcome", "PendingStep", "StepQueue", "step_copies", "train_group"]

GroupOutcome = tuple[dict[str, float] | BaseException, dict[str, Any]]
"""One request's result in a group: its step values or its error, and the copies it asked for."""


@dataclass(eq=False)
class PendingStep:
    """A TrainStep waiting for the device; its asker waits on ``future``."""

    msg: TrainStep
    future: asyncio.Future[TrainStepResult]
    enqueued: float = field(default_factory=time.perf_counter)


RESOURCE = TRAIN  # the trainer's device, for the scheduler


class StepQueue:
    """TrainSteps waiting for the device, in arrival order; ``take_group`` serves them in the scheduler's."""

    def __init__(self, fuse_max: int, scheduler: Scheduler | None = None) -> None:
        if fuse_max < 1:
            raise ValueError(f"fuse_max must be >= 1, got {fuse_max}")
        self.fuse_max = fuse_max
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.yields = YieldGate(self.scheduler)
        self._pending: deque[PendingStep] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, pending: PendingStep) -> bool:
        return pending in self._pending

    def __iter__(self) -> Iterator[PendingStep]:
        return iter(self._pending)

    def push(self, msg: TrainStep) -> PendingStep:
        pending = PendingStep(msg, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self.scheduler.wait(RESOURCE, msg.tenant)
        return pending

    async def ready(self, pending: PendingStep) -> None:
        """Return when ``pending``'s tenant need not yield to a higher class (or ``pending`` is done)."""
        if self._yielding(pending.msg.tenant):
            await self.yields.until_clear(RESOURCE, pending.msg.tenant, unless=pending.future)

    def _yielding(self, tenant: str) -> bool:
        """``tenant``'s step must not start now; its hold opens (it stays open until a step is taken)."""
        if not self.scheduler.yields_to(RESOURCE, tenant):
            return False
        if not self.scheduler.held(RESOURCE, tenant):
            self.scheduler.hold(RESOURCE, tenant)
        return True

    def discard(self, pending: PendingStep) -> None:
        """Forget a step whose asker gave up (no effect once a group took it)."""
        if pending in self._pending:
            self._pending.remove(pending)
            if not any(p.msg.tenant == pending.msg.tenant for p in self._pending):
                self.scheduler.cancel(RESOURCE, pending.msg.tenant)
                if self.scheduler.held(RESOURCE, pending.msg.tenant):
                    self.scheduler.unhold(RESOURCE, pending.msg.tenant, went=False)

    def take_group(self) -> list[PendingStep]:
        """Remove and return the next group: the oldest pending step of each of up to ``fuse_max``
        tenants that need not yield, in the scheduler's order. Empty when nothing is pending, or
        when every pending tenant must yield to a higher class."""
        oldest: dict[str, PendingStep] = {}
        for pending in self._pending:
            oldest.setdefault(pending.msg.tenant, pending)
        for tenant in oldest:  # idempotent; re-declares a tenant the scheduler forgot
            self.scheduler.wait(RESOURCE, tenant)
        free = [tenant for tenant in oldest if not self._yielding(tenant)]
        chosen = self.scheduler.pick(RESOURCE, k=self.fuse_max, among=free)
        for tenant in chosen:
            if self.scheduler.held(RESOURCE, tenant):  # aged, or the higher class went idle: the hold ends
                self.scheduler.unhold(RESOURCE, tenant)
        group = [oldest[tenant] for tenant in chosen]
        for pending in group:
            self._pending.remove(pending)
        for tenant in chosen:  # a tenant with more steps queued waits again
            if any(p.msg.tenant == tenant for p in self._pending):
                self.scheduler.wait(RESOURCE, tenant)
        return group

    def charge(self, group: list[PendingStep], seconds: float) -> None:
        """The group used the device ``seconds``: each tenant's share by its steps' tokens."""
        tokens = [max(1, sum(len(d.tokens) for d in p.msg.data)) for p in group]
        total = sum(tokens)
        for pending, n in zip(group, tokens):
            self.scheduler.charge(RESOURCE, pending.msg.tenant, seconds * n / total)


def step_copies(core: TrainerCore, msg: TrainStep, values: dict[str, float]) -> dict[str, Any]:
    """The copies ``msg`` asked for, of the tenant's version right after its step
    (TrainStepResult ``adapter`` / ``state``); their time goes into ``values["time/copy"]``."""
    started = time.perf_counter()
    copies: dict[str, AdapterSnapshot | StoreState] = {}
    if msg.copy_adapter:
        copies["adapter"] = core.snapshot(msg.tenant)
    if msg.copy_state:
        copies["state"] = core.store(msg.tenant).export_state()
    if copies:
        values["time/copy"] = time.perf_counter() - started
    return copies


def train_group(core: TrainerCore, msgs: list[TrainStep]) -> list[GroupOutcome]:
    """One group's step (single-adapter path for one request, fused for several), then each trained
    tenant's copies, all in one device job. Runs in the trainer's worker thread."""
    requests = [FusedRequest(m.tenant, m.data, m.loss) for m in msgs]
    if len(requests) == 1:
        try:
            outcomes: list[dict[str, float] | BaseException] = [
                core.train_step(requests[0].tenant, requests[0].data, requests[0].loss)
            ]
        except Exception as exc:  # noqa: BLE001 - delivered to this request's asker
            outcomes = [exc]
    else:
        outcomes = list(core.train_steps_fused(requests))
    results: list[GroupOutcome] = []
    for msg, outcome in zip(msgs, outcomes, strict=True):
        copies: dict[str, Any] = {}
        if not isinstance(outcome, BaseException):
            try:
                copies = step_copies(core, msg, outcome)
            except Exception as exc:  # noqa: BLE001 - this tenant's asker sees it; the others go on
                outcome = exc
        results.append((outcome, copies))
    return results
