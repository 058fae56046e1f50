"""Old adapter versions that finish their requests beside the new one, until they are unloaded.

With ``LoadAdapter.keep_serving`` a tenant's new version loads under a new LoRA id while the old
version's requests are still decoding (docs/async.md). The SamplerActor hands the old version's
slot to ``RetiringVersions.add``; when the slot's last request ends (``drained``; at once if it
had none) its unload runs as a task of its own (``unload(slot)``, the actor's engine call), so a
finishing request never waits for it and a cancelled request cannot skip it. ``wait_unloaded``
lets a tenant's removal wait for its old versions; ``close`` finishes or forces every unload
when the sampler stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["RetiringVersions"]


class _Slot(Protocol):
    tenant: str
    lora_id: int
    version: int
    in_flight: int
    idle: asyncio.Event


class RetiringVersions:
    """Per tenant, the old versions still decoding; each is unloaded once drained."""

    def __init__(self, unload: Callable[[Any], Awaitable[None]]) -> None:
        self._unload = unload
        self._slots: dict[str, list[_Slot]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}  # lora id -> its unload

    def add(self, slot: _Slot) -> None:
        """``slot``'s version no longer takes new requests; it leaves when ``drained``."""
        self._slots.setdefault(slot.tenant, []).append(slot)

    def drained(self, slot: _Slot) -> None:
        """``slot``'s last request ended: start its unload (once)."""
        if slot.lora_id not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._run(slot), name=f"unload-{slot.lora_id}")
            self._tasks[slot.lora_id] = task

    async def _run(self, slot: _Slot) -> None:
        try:
            await self._unload(slot)
        finally:
            slots = self._slots.get(slot.tenant, [])
            if slot in slots:
                slots.remove(slot)
            if not slots:
                self._slots.pop(slot.tenant, None)
            self._tasks.pop(slot.lora_id, None)

    def slots(self, tenant: str) -> list[Any]:
        """The old slots of ``tenant`` not unloaded yet, oldest first."""
        return list(self._slots.get(tenant, []))

    def versions(self, tenant: str) -> list[int]:
        """The versions of ``tenant`` not unloaded yet, oldest first."""
        return [s.version for s in self._slots.get(tenant, [])]

    async def wait_unloaded(self, tenant: str) -> None:
        """Until every old version of ``tenant`` has finished its requests and is unloaded."""
        while self._slots.get(tenant):
            slot = self._slots[tenant][0]
            await slot.idle.wait()
            task = self._tasks.get(slot.lora_id)
            if task is not None:
                await asyncio.wait([task])
            elif slot in self._slots.get(tenant, []):
                await asyncio.sleep(0)  # its unload starts from the request that drains it

    async def close(self, remove: Callable[[int], Awaitable[None]] | None) -> None:
        """The sampler stops: let running unloads finish, then ``remove`` what is left (None: the
        engine is gone, just forget)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        left = [s for slots in self._slots.values() for s in slots]
        self._slots.clear()
        if remove is not None:
            for slot in left:
                await remove(slot.lora_id)
