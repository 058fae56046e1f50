"""Small asyncio helpers shared by the domain actors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

__all__ = ["gather_first_error"]

T = TypeVar("T")


async def gather_first_error(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently in a TaskGroup; on the first failure cancel the rest and raise that error
    itself (not an ExceptionGroup), with its own cause and traceback. Results keep input order."""
    error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_as_coroutine(a)) for a in awaitables]
    except BaseExceptionGroup as group:
        error = _first_error(group)
    if error is not None:
        raise error  # raised outside the except block, so no "during handling" chain is added
    return [t.result() for t in tasks]


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _first_error(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first
