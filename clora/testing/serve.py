"""``serve_in_thread``: a real ``clora serve`` (runtime + uvicorn on a free loopback port) in a
background thread, for tests that drive it with the official ``tinker`` / ``openai`` clients."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

__all__ = ["ServedRuntime", "serve_in_thread"]

T = TypeVar("T")


class ServedRuntime:
    """The running server: ``url``, ``server`` (clora.serve.Server), and ``call`` to run a coroutine
    function of the runtime on the server's event loop (e.g. to read a tenant's trainer state)."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.loop = server, loop

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runtime(self) -> Any:
        return self.server.state.runtime

    def call(self, fn: Callable[[Any], Awaitable[T]], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(fn(self.runtime), self.loop).result(timeout)


@contextlib.contextmanager
def serve_in_thread(
    config: Any, *, engine: Any, start_timeout: float = 120.0, **server_kwargs: Any
) -> Iterator[ServedRuntime]:
    """Start ``clora.serve.Server(config, port=0, engine=engine, **server_kwargs)`` in a thread; on exit
    stop it gracefully and wait for the thread (the runtime writes every tenant's adapter)."""
    from clora.serve.server import Server

    server = Server(config, port=0, engine=engine, **server_kwargs)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        try:
            loop.run_until_complete(server.serve(lambda _s: ready.set()))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            box["error"] = e
        finally:
            loop.close()
            ready.set()

    thread = threading.Thread(target=run, name="clora-serve", daemon=True)
    thread.start()
    if not ready.wait(start_timeout) or "error" in box:
        server.stop()
        raise RuntimeError(f"clora serve did not start: {box.get('error')!r}")
    try:
        yield ServedRuntime(server, box["loop"])
    finally:
        server.stop()
        thread.join(start_timeout)
        if "error" in box:
            raise box["error"]
