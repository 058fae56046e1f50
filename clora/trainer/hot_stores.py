"""Hot stores: a bounded set of tenants' adapter tensors kept on the training device (design, not wired).

Today every step copies its tenant's store from (pinned) host memory onto the device
(``clora.trainer.store.swap_in``) and writes the result back. On CUDA with many tenants that copy
sits on the critical path of every step. ``HotStores`` keeps the device copies of up to
``capacity`` tenants' tensors, keyed by (tenant, version), and lets the trainer start copying the
*next* tenant's store (the scheduler's next pick) on a side stream while the current step computes:

- ``prefetch(tenant, version, tensors)``: start the copy unless that version is already hot;
  room is made by evicting the least recently used entry that is not in use (never one in use:
  a step may be reading it). Over capacity with everything in use, nothing is prefetched.
- ``take(tenant, version, tensors)``: the device tensors of that version, waiting for a prefetch
  still in flight (hit), or copied now (miss; a stale version is dropped first). The entry is in
  use until ``release``.
- ``keep(tenant, version, tensors)`` after a successful step: the step's device results are the
  tenant's new version, so its next step needs no copy at all.

The device is behind ``Copier`` (``start(tensors) -> Pending``, ``Pending.wait() -> tensors``):
``CudaCopier`` copies with ``non_blocking`` on its own stream and makes the compute stream wait on
an event; on a CPU there is nothing to gain (host and device memory are the same), so
``for_device`` returns a set of capacity 0, where every call is a pass-through. Tests drive the
logic with a fake copier (tests/test_hot_stores.py).

Not wired into ``TrainerCore`` yet (see docs/scheduling.md): swap_in / write_back and the step
queue's lookahead are where it would plug in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Copier", "CudaCopier", "HotStores", "Pending", "for_device", "run_steps"]

Tensors = Mapping[str, Any]


class Pending(Protocol):
    def wait(self) -> dict[str, Any]:
        """The device tensors, once the copy finished (the caller's stream may use them after this)."""


class Copier(Protocol):
    def start(self, tensors: Tensors) -> Pending:
        """Start copying host ``tensors`` to the device; return at once."""


@dataclass(eq=False)
class _Entry:
    version: int
    pending: Pending
    in_use: bool = False


class HotStores:
    """Device copies of up to ``capacity`` tenants' store tensors (see the module docstring)."""

    def __init__(self, capacity: int, copier: Copier | None) -> None:
        if capacity < 0 or (capacity > 0 and copier is None):
            raise ValueError(f"a hot-store set needs capacity >= 0 and a copier when > 0, got {capacity}")
        self.capacity = capacity
        self.copier = copier
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.hits = self.misses = self.prefetches = self.evictions = 0

    def hot(self) -> dict[str, int]:
        """tenant -> the version whose copy is on the device (or on its way)."""
        return {t: e.version for t, e in self._entries.items()}

    def prefetch(self, tenant: str, version: int, tensors: Tensors) -> bool:
        """Start copying ``tenant``'s ``version`` unless it is hot; False when there is no room (or no device)."""
        entry = self._entries.get(tenant)
        if entry is not None and entry.version == version:
            self._entries.move_to_end(tenant)
            return True
        if self.capacity == 0 or (entry is not None and entry.in_use):
            return False
        self._entries.pop(tenant, None)  # a stale version
        if not self._make_room():
            return False
        self._entries[tenant] = _Entry(version, self.copier.start(tensors))
        self.prefetches += 1
        return True

    def take(self, tenant: str, version: int, tensors: Tensors) -> dict[str, Any] | None:
        """The device tensors of ``tenant``'s ``version`` (marked in use), or None without a device."""
        if self.capacity == 0:
            return None
        entry = self._entries.get(tenant)
        if entry is not None and entry.in_use:
            raise RuntimeError(f"tenant {tenant!r}'s hot store is already in use")
        if entry is not None and entry.version == version:
            self.hits += 1
        else:
            self.misses += 1
            self._entries.pop(tenant, None)
            self._make_room(force=True)
            entry = self._entries[tenant] = _Entry(version, self.copier.start(tensors))
        self._entries.move_to_end(tenant)
        entry.in_use = True
        return entry.pending.wait()

    def release(self, tenant: str) -> None:
        """The step that took ``tenant``'s tensors is over (failed or not); its entry may be evicted."""
        entry = self._entries.get(tenant)
        if entry is not None:
            entry.in_use = False

    def keep(self, tenant: str, version: int, device_tensors: dict[str, Any]) -> None:
        """A step succeeded: ``device_tensors`` (on the device) are ``tenant``'s new ``version``."""
        if self.capacity == 0:
            return
        self._entries.pop(tenant, None)
        self._make_room(force=True)
        self._entries[tenant] = _Entry(version, _Ready(device_tensors))

    def drop(self, tenant: str) -> None:
        """Forget ``tenant`` (removed, or its store replaced from outside a step)."""
        self._entries.pop(tenant, None)

    def _make_room(self, force: bool = False) -> bool:
        """Evict least recently used entries not in use until one more fits; ``force``: the caller
        needs the room (a step runs now), so only entries in use may stay above capacity."""
        while len(self._entries) >= self.capacity:
            victim = next((t for t, e in self._entries.items() if not e.in_use), None)
            if victim is None:
                return force
            del self._entries[victim]
            self.evictions += 1
        return True


@dataclass(frozen=True)
class _Ready:
    tensors: dict[str, Any]

    def wait(self) -> dict[str, Any]:
        return self.tensors


class CudaCopier:
    """Host -> CUDA copies on a side stream; ``wait`` makes the current stream wait for them."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def start(self, tensors: Tensors) -> Pending:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            copies = {k: t.to(self.device, non_blocking=True, copy=True) for k, t in tensors.items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        return _CudaPending(torch, copies, done, self.stream)


@dataclass(frozen=True)
class _CudaPending:
    torch: Any
    copies: dict[str, Any]
    done: Any
    stream: Any

    def wait(self) -> dict[str, Any]:
        current = self.torch.cuda.current_stream(self.stream.device)
        current.wait_event(self.done)
        for t in self.copies.values():  # the copy stream allocated them; the compute stream uses them now
            t.record_stream(current)
        return self.copies


def run_steps(hot: HotStores, steps: list[tuple[str, int, Tensors]],
              compute: Callable[[str, dict[str, Any] | None], dict[str, Any] | None]) -> None:
    """The trainer-side loop the set is made for: before step i computes, step i+1's store starts
    copying (it overlaps step i's compute); after a step, its results stay hot as the next version.
    ``steps``: (tenant, version, host tensors) in the scheduler's order; ``compute(tenant, device
    tensors)`` returns the new version's device tensors, or None when the step failed."""
    for i, (tenant, version, tensors) in enumerate(steps):
        device_tensors = hot.take(tenant, version, tensors)
        if i + 1 < len(steps):
            hot.prefetch(*steps[i + 1])
        try:
            result = compute(tenant, device_tensors)
        finally:
            hot.release(tenant)
        if result is not None:
            hot.keep(tenant, version + 1, result)


def for_device(device: Any, capacity: int) -> HotStores:
    """A hot-store set for ``device``: ``capacity`` entries on CUDA, none (pass-through) elsewhere."""
    if getattr(device, "type", str(device)) != "cuda" or capacity == 0:
        return HotStores(0, None)
    return HotStores(capacity, CudaCopier(device))
