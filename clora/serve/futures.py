"""Tinker futures: a request answers with an id at once; its work runs in the background and the
client polls ``retrieve_future`` until the result is there.

Work on one model runs in the order it arrived (the SDK submits a training client's requests in
its order and expects them applied in that order). A future belongs to the key that made it.

Shutdown (``aclose``) never waits without a bound: work still queued behind its model's earlier work
is dropped, running work gets ``bound_s`` to finish and is then cancelled, each with an event naming
the futures. Cancelling is safe for the stores: a trainer step already running finishes in the
trainer (only its asker is cancelled), and a sample is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from clora import events
from clora.errors import AccessDeniedError, NotFoundError

__all__ = ["FutureStore", "CANCEL_WAIT_S"]

KEEP_DONE = 4096  # finished futures kept for retrieval (oldest dropped first)
CANCEL_WAIT_S = 5.0  # at shutdown, how long cancelled work may take to unwind before we stop waiting


@dataclass
class _Future:
    owner: str  # the key name that made it
    kind: str  # what it does: the route that made it ("asample", "forward_backward", ...)
    model: str | None  # the model whose chain it is in (None: unchained, e.g. a sample)
    task: asyncio.Task[Any] = field(init=False)
    started: bool = False  # its work began (its model's earlier work finished)
    created: float = field(default_factory=time.monotonic)

    def describe(self, request_id: str) -> dict[str, Any]:
        """For the shutdown events: which future, what it does, and where its work waits now."""
        return {"request_id": request_id, "kind": self.kind, "model": self.model,
                "age_s": round(time.monotonic() - self.created, 3), "waiting_in": _awaiting(self.task)}


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: its chain of awaits, innermost last (``module:line function < ...``)."""
    where, coro = [], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            module = frame.f_globals.get("__name__", "?")
            where.append(f"{module}:{frame.f_lineno} {frame.f_code.co_qualname}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(where)


class FutureStore:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._futures: OrderedDict[str, _Future] = OrderedDict()
        self._last: dict[str, asyncio.Task[Any]] = {}  # model id -> its newest task (the chain)

    def submit(self, owner: str, chain: str | None, work: Callable[[], Awaitable[Any]], kind: str = "work") -> str:
        """Start ``work`` after the previous work of ``chain`` (a model id) finished; its future id."""
        previous = self._last.get(chain) if chain is not None else None
        entry = _Future(owner, kind, chain)

        async def run() -> Any:
            if previous is not None:
                await asyncio.wait([previous])
            entry.started = True
            return await work()

        task = entry.task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)  # retrieved later
        if chain is not None:
            self._last[chain] = task
            task.add_done_callback(lambda t, c=chain: self._last.pop(c, None) if self._last.get(c) is t else None)
        request_id = f"req-{next(self._ids)}"
        self._futures[request_id] = entry
        while len(self._futures) > KEEP_DONE:
            oldest, old = next(iter(self._futures.items()))
            if not old.task.done():
                break
            del self._futures[oldest]
        return request_id

    async def wait(self, request_id: str, owner: str, admin: bool, timeout: float) -> asyncio.Task[Any] | None:
        """The finished task of ``request_id``, or None if it is still running after ``timeout`` s."""
        entry = self._futures.get(request_id)
        if entry is None:
            raise NotFoundError(f"unknown future {request_id!r}")
        if entry.owner != owner and not admin:
            raise AccessDeniedError("not allowed: this future belongs to another API key")
        task = entry.task
        if not task.done():
            await asyncio.wait([task], timeout=timeout)
        return task if task.done() else None

    async def aclose(self, bound_s: float, log: Any = None) -> None:
        """Shutdown: drop queued work, let running work finish for ``bound_s`` at most, cancel what is
        left (``serve.futures_dropped`` / ``serve.futures_cancelled`` name them), then forget everything.
        Returns within about ``bound_s + 2 * CANCEL_WAIT_S`` whatever the work does."""
        pending = [(rid, f) for rid, f in self._futures.items() if not f.task.done()]
        queued = [(rid, f) for rid, f in pending if not f.started]
        running = [(rid, f) for rid, f in pending if f.started]
        if queued:
            if log is not None:
                log.warning(events.SERVE_FUTURES_DROPPED, count=len(queued),
                            futures=[f.describe(rid) for rid, f in queued])
            for _, f in queued:
                f.task.cancel()
            await asyncio.wait([f.task for _, f in queued], timeout=CANCEL_WAIT_S)
        if running:
            await asyncio.wait([f.task for _, f in running], timeout=bound_s)
        late = [(rid, f) for rid, f in running if not f.task.done()]
        if late:
            described = [f.describe(rid) for rid, f in late]
            for _, f in late:
                f.task.cancel()
            _, stuck = await asyncio.wait([f.task for _, f in late], timeout=CANCEL_WAIT_S)
            if log is not None:
                log.warning(events.SERVE_FUTURES_CANCELLED, count=len(late), bound_s=bound_s,
                            still_unwinding=len(stuck), futures=described)
        self._futures.clear()
        self._last.clear()
