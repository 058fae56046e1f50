"""Test helpers for asyncio code."""

from __future__ import annotations

import asyncio
from typing import Callable


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail with TimeoutError after ``timeout`` seconds.

    The bound only guards against a hang (generous, so a loaded CI machine does not flake).
    """
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
