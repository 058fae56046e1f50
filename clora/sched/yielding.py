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

__all__ = ["YieldGate"]


class YieldGate:
    """Waits for ``scheduler.yields_to(resource, tenant)`` to be empty, woken by the scheduler's changes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._waiters: list[tuple[str, str, asyncio.Future[None]]] = []
        self._unsubscribe = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None

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
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = self._loop.create_future()
        item = (resource, tenant, future)
        self._waiters.append(item)
        self._watch()
        try:
            if unless is None:
                await future
            else:
                await asyncio.wait({future, unless}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if item in self._waiters:
                self._waiters.remove(item)
            future.cancel()  # no effect once resolved
            self._watch()

    def _watch(self) -> None:
        """Listen to the scheduler and arm the timer while anyone waits; stop when nobody does."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiters:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            return
        if self._unsubscribe is None:
            self._unsubscribe = self.scheduler.subscribe(self._poke)
        when = self.scheduler.next_yield_change()
        if when is not None and self._loop is not None:
            delay = max(0.0, when - self.scheduler.clock())
            self._timer = self._loop.call_later(delay + 1e-3, self._recheck)

    def _poke(self) -> None:
        """A scheduler change: re-check once the scheduler's call has returned."""
        if self._soon is None and self._loop is not None and not self._loop.is_closed():
            self._soon = self._loop.call_soon(self._recheck)

    def _recheck(self) -> None:
        self._soon = None
        for resource, tenant, future in list(self._waiters):
            if not future.done() and not self.scheduler.yields_to(resource, tenant):
                future.set_result(None)
        for resource in {r for r, _, _ in self._waiters}:
            self.scheduler.check_waits(resource)
        self._watch()
