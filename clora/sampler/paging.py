"""Adapter paging: more tenants than the engine keeps adapters for.

vLLM holds at most ``engine.cpu_loras`` tenant adapters (its CPU cache; beyond that it would evict
one silently and re-read it from its path). The pager keeps at most ``capacity`` adapters
*resident* (registered in the engine) and pages the others in when the scheduler admits their
requests:

- A page-in loads the tenant's adapter as it is recorded now: the version its waiting requests
  asked for (a tenant's version only changes while none of its requests is in flight, see
  clora.sampler.actor), under its own LoRA id. Its cost is the ``scheduler.page_in`` event's
  ``duration_s``.
- Room is made by paging out one resident adapter: never a tenant that holds an engine LoRA slot
  (requests in the engine), never one whose adapter is being replaced or removed (gate closed);
  tenants with no request at all before tenants whose requests wait for admission; then the least
  recently scheduled first.
- Every engine call that adds, replaces or removes a tenant adapter runs under ``lock``, so a
  page-out never races an in-place load of the same adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from clora import events

__all__ = ["AdapterPager", "PagedSlot"]


class PagedSlot(Protocol):
    tenant: str
    lora_id: int
    version: int
    in_flight: int
    resident: bool
    last_scheduled: float

    @property
    def adapter(self) -> tuple[str, int, Any]: ...


class AdapterPager:
    """Keeps at most ``capacity`` tenant adapters in ``engine``; pages the rest in and out."""

    def __init__(self, capacity: int, *, log: Callable[[], Any], in_engine: Callable[[str], bool],
                 changing: Callable[[str], bool]) -> None:
        if capacity < 1:
            raise ValueError(f"the engine must keep at least one adapter, got capacity {capacity}")
        self.capacity = capacity
        self._log = log  # -> the logger to use now (an actor's logger exists only once it started)
        self._in_engine = in_engine  # tenant -> it holds an engine LoRA slot
        self._changing = changing  # tenant -> its adapter is being replaced / removed
        self.lock = asyncio.Lock()
        self.page_ins = 0
        self.page_outs = 0

    def victim(self, slots: Iterable[PagedSlot], *, keep: str) -> PagedSlot | None:
        """The resident adapter to page out for ``keep``'s page-in, or None when none may go."""
        candidates = [s for s in slots if s.resident and s.tenant != keep
                      and not self._in_engine(s.tenant) and not self._changing(s.tenant)]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.in_flight > 0, s.last_scheduled, s.tenant))

    async def make_room(self, engine: Any, slots: list[PagedSlot], *, keep: str) -> bool:
        """Page out one adapter if the engine is full (caller holds ``lock``); False if it is full
        and none may go."""
        if sum(s.resident for s in slots) < self.capacity:
            return True
        victim = self.victim(slots, keep=keep)
        if victim is None:
            return False
        started = time.perf_counter()
        victim.resident = False  # from here on the engine may not serve it; on failure we re-load it
        await engine.remove_adapter(victim.lora_id)
        self.page_outs += 1
        self._log().info(events.SCHEDULER_PAGE_OUT, tenant=victim.tenant, version=victim.version,
                      lora_id=victim.lora_id, for_tenant=keep, duration_s=round(time.perf_counter() - started, 4),
                      resident=sum(s.resident for s in slots))
        return True

    async def page_in(self, engine: Any, slot: PagedSlot, slots: Callable[[], list[PagedSlot]]) -> float | None:
        """Make ``slot``'s adapter resident (its current version); the seconds it took, None if it was."""
        async with self.lock:
            if slot.resident:
                return None
            while not await self.make_room(engine, slots(), keep=slot.tenant):
                # every resident adapter is in use: wait for one to leave the engine (rare: capacity > slots)
                self.lock.release()
                try:
                    await asyncio.sleep(0.01)
                finally:
                    await self.lock.acquire()
                if slot.resident:
                    return None
            started = time.perf_counter()
            load = asyncio.ensure_future(engine.add_adapter(*slot.adapter))
            try:
                await asyncio.shield(load)
            except asyncio.CancelledError:
                await asyncio.wait([load])  # the engine finishes the load: the record must match it
                if not load.cancelled() and load.exception() is None:
                    slot.resident = True
                raise
            slot.resident = True
            duration = time.perf_counter() - started
            self.page_ins += 1
            self._log().info(events.SCHEDULER_PAGE_IN, tenant=slot.tenant, version=slot.version, lora_id=slot.lora_id,
                          duration_s=round(duration, 4), resident=sum(s.resident for s in slots()))
            return duration
