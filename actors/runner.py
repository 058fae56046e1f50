"""``run(main)``: run a coroutine function on uvloop when it is installed, asyncio otherwise."""

from __future__ import annotations

import asyncio
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


async def _call(main: Callable[[], Awaitable[Any]]) -> Any:
    return await main()
