"""``run(main)``: run a coroutine function on uvloop when it is installed, asyncio otherwise.

SIGTERM is treated like Ctrl-C: the main task is cancelled, so every ``async with`` (actor
systems, engines) unwinds and cleans up; the process then exits with 128 + the signal number.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Awaitable, Callable, TypeVar

__all__ = ["run", "uvloop_available"]

T = TypeVar("T")


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Callable[[], Awaitable[T]], *, use_uvloop: bool | None = None, debug: bool | None = None) -> T:
    """Run ``main()`` to completion in a fresh event loop and return its result.

    ``use_uvloop``: None picks uvloop when installed; True requires it; False forces asyncio.
    """
    if use_uvloop is None:
        use_uvloop = uvloop_available()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
        return runner.run(_call(main))


STOP_SIGNALS = (signal.SIGTERM,)


async def _call(main: Callable[[], Awaitable[Any]]) -> Any:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        task.cancel()

    installed = []
    for signum in STOP_SIGNALS:
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no POSIX signals
            pass
    try:
        return await main()
    except asyncio.CancelledError:
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
