"""Pinned versions in the engine: each live version of a tenant is its own adapter, never reloaded.

A pinned version ``N`` of tenant ``t`` is registered with the sampler under the name ``t@vN``
(``serving_key``) from the PEFT folder the version registry keeps; its weights never change, so a
request that leases it decodes on exactly that version, whatever is promoted or rolled back
meanwhile. Each such adapter holds one engine LoRA slot while it has requests in flight (the
sampler's SlotGate, with the tenant's scheduling policy) and is paged like any adapter when more
are registered than the engine keeps (clora.sampler.paging).

A version stays registered while a request leases it or while ``keep`` says so (an alias points at
it); the last lease of a version nobody keeps unregisters it (the sampler's RemoveAdapter, which
lets its in-flight requests finish first). A lease taken while the version is being unregistered
waits for that, then registers it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clora.errors import ConfigError
from clora.messages import RegisterAdapter, RemoveAdapter

__all__ = ["PinnedVersions", "serving_key"]


def serving_key(tenant: str, version: int) -> str:
    """The sampler-level name of tenant ``tenant``'s pinned ``version``."""
    return f"{tenant}@v{version}"


@dataclass(eq=False)
class _Pin:
    version: int
    load: asyncio.Task[None]
    leases: int = 0
    unload: asyncio.Task[None] | None = None


@dataclass
class PinnedVersions:
    """The pinned versions of one tenant in the engine.

    ``ask``: the runtime's ask (routes to the sampler); ``adapter_dir(version)``: the version's PEFT
    folder; ``keep()``: the versions to keep registered without leases; ``policy(key)``: give the
    engine-level name the tenant's scheduling policy (and ``forget(key)`` drop it); ``max_live``: most
    versions of this tenant registered at once (ConfigError beyond it)."""

    tenant: str
    ask: Callable[[Any], Awaitable[Any]]
    adapter_dir: Callable[[int], Path]
    keep: Callable[[], set[int]]
    policy: Callable[[str], None] = lambda key: None
    forget: Callable[[str], None] = lambda key: None
    max_live: int = 4
    _pins: dict[int, _Pin] = field(default_factory=dict)
    _unloading: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def live(self) -> list[int]:
        """Versions registered (or being registered) now, oldest first."""
        return sorted(self._pins)

    def in_flight(self, version: int) -> int:
        pin = self._pins.get(version)
        return pin.leases if pin else 0

    def _pin(self, version: int) -> _Pin:
        pin = self._pins.get(version)
        if pin is None:
            if len(self._pins) >= self.max_live:
                raise ConfigError(
                    f"tenant {self.tenant!r} already serves {len(self._pins)} versions ({self.live()}), its "
                    f"max_live_versions; free one (move an alias) or raise LearnerPolicy.max_live_versions")
            previous = self._unloading.get(version)
            pin = _Pin(version, asyncio.ensure_future(self._register(version, previous)))
            self._pins[version] = pin
        return pin

    async def _register(self, version: int, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its unregistration first: the sampler name must be free
        key = serving_key(self.tenant, version)
        self.policy(key)
        await self.ask(RegisterAdapter(tenant=key, path=str(self.adapter_dir(version)), version=version))

    async def warm(self, version: int) -> None:
        """Register ``version`` now (before an alias points at it, so its first request finds it loaded)."""
        async with self.lease(version):
            pass

    @contextlib.asynccontextmanager
    async def lease(self, version: int) -> AsyncIterator[str]:
        """Hold ``version`` registered for one request; yields the sampler-level tenant name to ask."""
        pin = self._pin(version)
        pin.leases += 1
        try:
            try:
                await asyncio.shield(pin.load)
            except BaseException:
                if pin.load.done() and self._pins.get(version) is pin and (
                        pin.load.cancelled() or pin.load.exception() is not None):
                    del self._pins[version]  # a failed load: the next lease tries again
                raise
            yield serving_key(self.tenant, version)
        finally:
            pin.leases -= 1
            self.release_idle()

    def release_idle(self) -> None:
        """Unregister every loaded version nobody leases or keeps (after an alias moved)."""
        keep = self.keep()
        for version, pin in list(self._pins.items()):
            if pin.leases == 0 and version not in keep and pin.load.done():
                del self._pins[version]
                if pin.load.cancelled() or pin.load.exception() is not None:
                    continue
                task = asyncio.ensure_future(self._unregister(version))
                self._unloading[version] = task
                task.add_done_callback(lambda t, v=version: self._unloading.pop(v, None)
                                       if self._unloading.get(v) is t else None)

    async def _unregister(self, version: int) -> None:
        key = serving_key(self.tenant, version)
        try:
            await self.ask(RemoveAdapter(tenant=key))
        finally:
            self.forget(key)

    async def close(self) -> None:
        """Unregister every pinned version (waits for their in-flight requests)."""
        for pin in list(self._pins.values()):
            await asyncio.wait([pin.load])
        keys = [v for v, p in self._pins.items() if not p.load.cancelled() and p.load.exception() is None]
        self._pins.clear()
        for version in keys:
            self._unloading[version] = asyncio.ensure_future(self._unregister(version))
        if self._unloading:
            await asyncio.wait(list(self._unloading.values()))
        self._unloading.clear()
