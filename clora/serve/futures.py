"""Tinker futures: a request answers with an id at once; its work runs in the background and the
client polls ``retrieve_future`` until the result is there.

Work on one model runs in the order it arrived (the SDK submits a training client's requests in
its order and expects them applied in that order). A future belongs to the key that made it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from clora.errors import AccessDeniedError, NotFoundError

__all__ = ["FutureStore"]

KEEP_DONE = 4096  # finished futures kept for retrieval (oldest dropped first)


class FutureStore:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._futures: OrderedDict[str, tuple[str, asyncio.Task[Any]]] = OrderedDict()
        self._last: dict[str, asyncio.Task[Any]] = {}  # model id -> its newest task (the chain)

    def submit(self, owner: str, chain: str | None, work: Callable[[], Awaitable[Any]]) -> str:
        """Start ``work`` after the previous work of ``chain`` (a model id) finished; its future id."""
        previous = self._last.get(chain) if chain is not None else None

        async def run() -> Any:
            if previous is not None:
                await asyncio.wait([previous])
            return await work()

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)  # retrieved later
        if chain is not None:
            self._last[chain] = task
            task.add_done_callback(lambda t, c=chain: self._last.pop(c, None) if self._last.get(c) is t else None)
        request_id = f"req-{next(self._ids)}"
        self._futures[request_id] = (owner, task)
        while len(self._futures) > KEEP_DONE:
            oldest, (_, old_task) = next(iter(self._futures.items()))
            if not old_task.done():
                break
            del self._futures[oldest]
        return request_id

    async def wait(self, request_id: str, owner: str, admin: bool, timeout: float) -> asyncio.Task[Any] | None:
        """The finished task of ``request_id``, or None if it is still running after ``timeout`` s."""
        entry = self._futures.get(request_id)
        if entry is None:
            raise NotFoundError(f"unknown future {request_id!r}")
        if entry[0] != owner and not admin:
            raise AccessDeniedError("not allowed: this future belongs to another API key")
        task = entry[1]
        if not task.done():
            await asyncio.wait([task], timeout=timeout)
        return task if task.done() else None

    async def aclose(self) -> None:
        """Let running work finish (a store is never half-written), then forget everything."""
        running = [task for _, task in self._futures.values() if not task.done()]
        if running:
            await asyncio.wait(running)
        self._futures.clear()
