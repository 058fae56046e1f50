"""Waiting in async tests without sleeping a guessed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 5 ms until it is true; ``TimeoutError`` after ``timeout`` seconds.

    The bound only guards against a hang: make it generous, so a loaded machine does not flake.
    """
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
