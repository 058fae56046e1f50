"""YieldGate: lower classes' new work waits while a higher class is active (the asyncio side of
``Scheduler.yields_to``, clora.sched.policy).

``clear(resource, tenant)`` returns at once when the tenant need not yield; otherwise it opens (or
joins) the tenant's hold and returns when the scheduler says it may go: a higher class went idle
and its linger ended, the tenant's priority changed, a tenant was removed, or the hold aged. The
gate re-checks its waiters after every change of the scheduler (deferred to the event loop, never
inside the scheduler's own call) and at ``Scheduler.next_yield_change`` (lingers ending, holds
aging or passing the wait bound), so nothing polls. Cancelling a wait gives up its part of the hold.

``until_clear`` is the same wait for a caller that keeps the hold itself (the trainer's step queue:
its hold lasts until its step is taken, see clora.trainer.step_queue).
"""

from __future__ import annotations

import asyncio

from clora.sched.policy import Scheduler
from clora.sched.watch import SchedulerWatch

__all__ = ["YieldGate"]


class YieldGate:
    """Waits for ``scheduler.yields_to(resource, tenant)`` to be empty, woken by the scheduler's changes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._waiters: list[tuple[str, str, asyncio.Future[None]]] = []
        self._watch = SchedulerWatch(scheduler, self._recheck)

    def waiting(self) -> list[str]:
        """Tenants with work waiting here now (tests, stats)."""
        return [tenant for _, tenant, future in self._waiters if not future.done()]

    async def clear(self, resource: str, tenant: str) -> None:
        """Return when ``tenant`` may start new work on ``resource``, holding it back meanwhile."""
        if not self.scheduler.yields_to(resource, tenant):
            return
        self.scheduler.hold(resource, tenant)
        went = False
        try:
            await self.until_clear(resource, tenant)
            went = True
        finally:
            self.scheduler.unhold(resource, tenant, went=went)

    async def until_clear(self, resource: str, tenant: str, unless: asyncio.Future | None = None) -> None:
        """Return when ``tenant`` need not yield on ``resource`` (or ``unless`` is done); holds are the caller's."""
        if not self.scheduler.yields_to(resource, tenant):
            return
        future = self._watch.future()
        item = (resource, tenant, future)
        self._waiters.append(item)
        self._watch.arm(bool(self._waiters))
        try:
            if unless is None:
                await future
            else:
                await asyncio.wait({future, unless}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if item in self._waiters:
                self._waiters.remove(item)
            future.cancel()  # no effect once resolved
            self._watch.arm(bool(self._waiters))

    def _recheck(self) -> None:
        for resource, tenant, future in list(self._waiters):
            if not future.done() and not self.scheduler.yields_to(resource, tenant):
                future.set_result(None)
        for resource in {r for r, _, _ in self._waiters}:
            self.scheduler.check_waits(resource)
        self._watch.arm(bool(self._waiters))
