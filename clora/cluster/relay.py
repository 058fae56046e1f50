"""Events of the actors a Ray host runs, relayed to the driver's events.jsonl.

Where the actor runs, ``EventBuffer`` is the whole structlog chain of its ActorSystem: each event becomes
a JSON-able dict stamped with its time, level and placement fields (``node_id``, ``replica``, ``pid``,
``role``) and waits in the buffer. The driver's proxy takes batches (``take``, a long poll of the host)
and ``replay``s them through its own logger, so they reach events.jsonl (and the console filter) like
the driver's own events, with the time they happened where they happened.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import msgspec
import structlog

from clora.events import _to_jsonable

__all__ = ["EventBuffer", "replay", "buffer_logger"]

_ENCODER = msgspec.json.Encoder(enc_hook=_to_jsonable)
MAX_BUFFERED = 100_000  # events kept while nobody takes them (the oldest go first)


class EventBuffer:
    """A structlog processor that keeps every event (with ``placement`` fields) for the driver."""

    def __init__(self, placement: dict[str, Any]) -> None:
        self.placement = dict(placement)
        self._events: collections.deque[bytes] = collections.deque(maxlen=MAX_BUFFERED)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None

    def bind_loop(self) -> None:
        """Call on the loop that takes batches (events may be logged from other threads)."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        record = {**event_dict, **self.placement, "ts": time.time(), "level": method_name}
        self._events.append(_ENCODER.encode(record))
        if self._loop is not None and self._ready is not None:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: the host is going away
                pass
        raise structlog.DropEvent

    def wake(self) -> None:
        if self._ready is not None:
            self._ready.set()

    async def take(self, timeout_s: float) -> list[bytes]:
        """The buffered events, waiting up to ``timeout_s`` for the first one."""
        if not self._events and self._ready is not None:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                pass
        batch = list(self._events)
        self._events.clear()
        return batch


def buffer_logger(buffer: EventBuffer) -> Any:
    """A structlog logger whose events all go to ``buffer`` (debug included)."""
    return structlog.wrap_logger(
        None, processors=[buffer], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
    )


def replay(log: Any, batch: list[bytes]) -> int:
    """Log every event of ``batch`` through ``log`` (the driver's), keeping its fields, time and level."""
    for line in batch:
        record = msgspec.json.decode(line)
        name = record.pop("event", "?")
        method = getattr(log, record.pop("level", "info"), log.info)
        method(name, **record)
    return len(batch)
