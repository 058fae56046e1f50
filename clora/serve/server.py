"""``clora serve``: one warm runtime behind the HTTP application, until SIGTERM / Ctrl-C.

Shutdown: uvicorn stops accepting, lets in-flight requests finish (``graceful_s`` at most, then they
are cancelled); Tinker futures still queued are dropped and running ones get ``graceful_s`` to finish,
then are cancelled (clora.serve.futures; a trainer step already running finishes, so a store is never
half-written); ``serve.stopped`` is logged; then the runtime closes every tenant, which writes its
adapter to ``<run_dir>/tenants/<name>/adapter``. Nothing waits on a client that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clora import events
from clora.config import RuntimeConfig
from clora.serve.app import create_app
from clora.serve.auth import KeyRing
from clora.serve.defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT
from clora.serve.state import ServeState

__all__ = ["Server", "DEFAULT_PORT"]


class Server:
    """Runtime + HTTP server. ``engine``: a running engine to borrow (``clora.testing.FakeEngine`` in tests)."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        keys: KeyRing | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        base_model_name: str | None = None,
        run_dir: str | Path | None = None,
        engine: Any = None,
        graceful_s: float = 30.0,
        console_level: str = "warning",
    ) -> None:
        self.config, self.host, self.keys = config, host, keys or KeyRing()
        self.max_body_bytes, self.run_dir, self.engine = max_body_bytes, run_dir, engine
        self.base_model_name = base_model_name
        self.graceful_s, self.console_level = graceful_s, console_level
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port: int = self.socket.getsockname()[1]
        self.state: ServeState | None = None
        self._uvicorn: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _catch_signals(self) -> None:
        """SIGTERM / SIGINT start the graceful shutdown (main thread only; elsewhere ``stop()`` does)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Ask the server to shut down gracefully (thread-safe enough: uvicorn polls the flag)."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    async def serve(self, on_ready: Callable[["Server"], None] | None = None) -> None:
        import uvicorn

        from clora.runtime import Runtime

        started = time.perf_counter()
        runtime = Runtime(self.config, run_dir=self.run_dir, engine=self.engine, console_level=self.console_level)
        async with runtime:
            name = self.base_model_name or Path(str(runtime.model_dir)).name
            self.state = ServeState(runtime=runtime, keys=self.keys, base_model=name)
            app = create_app(self.state, max_body_bytes=self.max_body_bytes)
            config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                    timeout_graceful_shutdown=self.graceful_s)
            self._uvicorn = _Uvicorn(config)
            log = runtime.log
            self._catch_signals()
            try:
                serving = asyncio.create_task(self._uvicorn.serve(sockets=[self.socket]))
                while not self._uvicorn.started and not serving.done():
                    await asyncio.sleep(0.01)
                self.state.ready = not serving.done()
                if self.state.ready:
                    log.info(events.SERVE_STARTED, host=self.host, port=self.port, keys=len(self.keys),
                             auth="keys" if self.keys.enabled else "localhost-only")
                    if on_ready is not None:
                        on_ready(self)
                await serving
            finally:
                self.state.ready = False
                try:
                    await self.state.futures.aclose(self.graceful_s, log)
                finally:  # logged even if the drain fails or is interrupted
                    log.info(events.SERVE_STOPPED, duration_s=round(time.perf_counter() - started, 3),
                             requests=self.state.requests, errors=self.state.errors)


def _uvicorn_server_class() -> type:
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn without its own signal handling: it would re-raise SIGTERM after shutting down, killing
        the process before the runtime closed its tenants; ``Server`` handles the signals instead."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            yield

    return Uvicorn


def _Uvicorn(config: Any) -> Any:  # noqa: N802 - a class made on first use (uvicorn imports lazily)
    return _uvicorn_server_class()(config)
