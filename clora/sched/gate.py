"""SlotGate: ``capacity`` slots of one resource, handed out by a Scheduler (the asyncio side).

A tenant asks with ``acquire`` (one hold per tenant: its in-flight requests share it) and gives
its slot back with ``release``; the time it held the slot is charged to it as device-seconds.
Whenever a slot is free and tenants wait, the scheduler picks who gets it (clora.sched.policy).
Cancelling ``acquire`` before the grant gives up the place in line; after the grant, it gives the
slot back, so a slot is never lost.

A waiter that must yield to a higher class (``Scheduler.yields_to``, e.g. one whose request passed its
yield check before the higher class became active) is not granted a slot meanwhile: it is held (its
hold ages as any, and closes at its grant), and the gate dispatches again after every change of the
scheduler and at ``Scheduler.next_yield_change`` while anyone is held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from clora.sched.policy import Scheduler
from clora.sched.watch import SchedulerWatch

__all__ = ["SlotGate"]


class SlotGate:
    """``capacity`` slots of ``resource``; the scheduler decides the order of waiting tenants."""

    def __init__(self, scheduler: Scheduler, resource: str, capacity: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"a gate needs at least one slot, got {capacity}")
        self.scheduler = scheduler
        self.resource = resource
        self.capacity = capacity
        self.clock = clock
        self._holders: dict[str, float] = {}  # tenant -> when it got its slot
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._held: set[str] = set()  # waiters held back: they yield to a higher class
        self._watch = SchedulerWatch(scheduler, self._dispatch)  # while waiters are held

    @property
    def free(self) -> int:
        return self.capacity - len(self._holders)

    def holds(self, tenant: str) -> bool:
        return tenant in self._holders

    def waiting(self) -> list[str]:
        return list(self._waiters)

    async def acquire(self, tenant: str) -> None:
        """Wait until ``tenant`` holds a slot (at once when it already does)."""
        if tenant in self._holders:
            return
        if tenant in self._waiters and self._waiters[tenant].done():  # a cancelled wait not yet cleaned up
            del self._waiters[tenant]
        if tenant in self._waiters:
            raise RuntimeError(f"tenant {tenant!r} already waits for a {self.resource} slot")
        future = self._watch.future()
        self._waiters[tenant] = future
        self.scheduler.wait(self.resource, tenant)
        self._dispatch()
        try:
            while not future.done():  # past the wait bound, the scheduler says so even if no slot frees
                await asyncio.wait([future], timeout=self.scheduler.wait_bound_s or None)
                self.scheduler.check_waits(self.resource)
            future.result()
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(tenant)  # granted just before the cancellation: give it back
            elif self._waiters.get(tenant) is future:
                del self._waiters[tenant]
                self.scheduler.cancel(self.resource, tenant)
                self._dispatch()
            raise

    def release(self, tenant: str) -> None:
        """``tenant`` gives its slot back; its hold time is charged; the next waiter is chosen."""
        granted = self._holders.pop(tenant, None)
        if granted is None:
            return
        self.scheduler.charge(self.resource, tenant, self.clock() - granted)
        self._dispatch()

    def _dispatch(self) -> None:
        for tenant in [t for t, f in self._waiters.items() if f.done()]:  # cancelled, its task not yet resumed
            del self._waiters[tenant]
            self.scheduler.cancel(self.resource, tenant)
        for tenant in self._held - self._waiters.keys():  # gave up while held
            self._held.discard(tenant)
            self.scheduler.unhold(self.resource, tenant, went=False)
        while len(self._holders) < self.capacity and self._waiters:
            for tenant in self._waiters:  # idempotent; re-declares a waiter the scheduler forgot (removed)
                self.scheduler.wait(self.resource, tenant)
            free = [t for t in self._waiters if not self._yielding(t)]
            chosen = self.scheduler.pick(self.resource, among=free)
            if not chosen:
                break
            tenant = chosen[0]
            future = self._waiters.pop(tenant)
            if tenant in self._held:
                self._held.discard(tenant)
                self.scheduler.unhold(self.resource, tenant)
            self._holders[tenant] = self.clock()
            future.set_result(None)
        self._watch.arm(bool(self._held))

    def _yielding(self, tenant: str) -> bool:
        """``tenant`` must not get a slot now (a higher class is active); its hold opens once."""
        if not self.scheduler.yields_to(self.resource, tenant):
            return False
        if tenant not in self._held:
            self._held.add(tenant)
            self.scheduler.hold(self.resource, tenant)
        return True
