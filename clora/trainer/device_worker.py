"""DeviceWorker: the trainer's one worker thread and the lock that gives it the device.

All torch work runs in one thread, so the event loop (which also streams the sampler's results) never
blocks, and one job at a time owns the device. A job is never half-done for its caller: if the
awaiting task is cancelled, ``finish`` waits until the thread has finished the job (its writes are then
complete, or it made none) and re-raises the cancellation. After every job the heap memory its
temporaries freed goes back to the OS (clora.trainer.memory).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from clora.trainer import memory

__all__ = ["DeviceWorker"]

T = TypeVar("T")


class DeviceWorker:
    """One worker thread (``start`` .. ``shutdown``) and the device ``lock`` over it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._executor is not None

    def start(self, thread_name: str) -> None:
        """Start the thread (named ``thread_name``); a no-op while it runs."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    def shutdown(self) -> None:
        """Stop the thread after the job it runs (if any)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread under the lock; if cancelled meanwhile, wait for ``fn`` to finish
        first (see ``finish``)."""
        async with self.lock:
            return await self.finish(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Hand ``fn(*args)`` to the thread (the caller holds the lock)."""
        if self._executor is None:
            raise RuntimeError("the device worker is not started")
        call = functools.partial(contextvars.copy_context().run, _then_release_memory, fn, *args)
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    @staticmethod
    async def finish(future: asyncio.Future[T]) -> T:
        """Await a job; if cancelled, first wait until the thread is done with it, then re-raise."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except Exception:
                    break
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation is what the caller sees
            raise


def _then_release_memory(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, then give the heap memory its temporaries freed back to the OS."""
    try:
        return fn(*args)
    finally:
        memory.release_free_memory()
