"""SchedulerWatch: call back on the event loop when a yield decision may have changed.

A gate that holds tenants back (clora.sched.yielding.YieldGate, clora.sched.gate.SlotGate) must look
again after every change of the scheduler (a tenant charged, a priority changed, a tenant removed) and
when time alone changes the answer (a linger ends, a hold ages or passes the wait bound:
``Scheduler.next_yield_change``). The watch does both while it is armed and nothing otherwise, so
nothing polls. Changes call back once per turn of the loop, never inside the scheduler's own call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clora.sched.policy import Scheduler

__all__ = ["SchedulerWatch"]


class SchedulerWatch:
    """Runs ``callback`` after scheduler changes and at the next yield change, while armed."""

    def __init__(self, scheduler: Scheduler, callback: Callable[[], None]) -> None:
        self.scheduler = scheduler
        self.callback = callback
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the last waiter: call backs go there
        self._unsubscribe: Callable[[], None] | None = None
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None

    def future(self) -> asyncio.Future[None]:
        """A waiter's future on the running loop, the loop the watch then calls back on."""
        self._loop = asyncio.get_running_loop()
        return self._loop.create_future()

    def arm(self, armed: bool) -> None:
        """Listen and set the timer for the next yield change while ``armed``; stop listening otherwise."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not armed:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            return
        if self._unsubscribe is None:
            self._unsubscribe = self.scheduler.subscribe(self._changed)
        when = self.scheduler.next_yield_change()
        if when is not None and self._loop is not None:
            delay = max(0.0, when - self.scheduler.clock())
            self._timer = self._loop.call_later(delay + 1e-3, self._fire)

    def _changed(self) -> None:
        if self._soon is None and self._loop is not None and not self._loop.is_closed():
            self._soon = self._loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._soon = None
        self.callback()
