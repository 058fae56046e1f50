"""A tenant's steps with the rollouts of the next ``ahead`` steps in flight while one trains.

    async with aclosing(pipelined(first, last, ahead, start, train)) as steps:
        async for step, record in steps: ...

``start(s)`` is called synchronously when step s's rollout may begin (it draws the step's problems
then, so draws stay in step order) and returns the awaitable rollout; ``train(s, rollout)`` trains
and publishes step s. Steps train one at a time, in order. Step s's rollout starts only once step
s - 1 - ahead has trained and published, so everything it samples uses a version at least the one
step s - 1 - ahead produced; since every step adds at most one version, step s trains on a version
at most ``ahead`` newer than any it sampled with: the bound ``u - v <= ahead`` holds by
construction (and the trainer checks it again, clora.trainer.staleness). ``ahead = 0`` is the
synchronous loop: rollout, train, publish, next rollout.

Leaving early (an error, cancellation, ``aclose``) cancels the rollouts in flight and waits for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

__all__ = ["pipelined"]

R = TypeVar("R")
T = TypeVar("T")


async def pipelined(
    first: int,
    last: int,
    ahead: int,
    start: Callable[[int], Awaitable[R]],
    train: Callable[[int, R], Awaitable[T]],
) -> AsyncIterator[tuple[int, T]]:
    """Steps ``first`` .. ``last`` (inclusive), each yielded as ``(step, train's result)`` once trained."""
    if ahead < 0:
        raise ValueError(f"ahead must be >= 0, got {ahead}")
    rollouts: dict[int, asyncio.Future[R]] = {}
    try:
        for step in range(first, last + 1):
            for s in range(step, min(step + ahead, last) + 1):  # steps <= step - 1 are trained
                if s not in rollouts:
                    rollouts[s] = asyncio.ensure_future(start(s))
            rollout = await rollouts.pop(step)
            yield step, await train(step, rollout)
    finally:
        for future in rollouts.values():
            future.cancel()
        if rollouts:
            await asyncio.gather(*rollouts.values(), return_exceptions=True)

