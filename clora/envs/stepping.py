"""One tenant's env steps, off the event loop and under a deadline.

An env's ``Episode.step`` runs the tools (a Calculator, a code runner, a web call...). Run on the
event loop, a slow or hanging step would stall every tenant's rollouts, the trainer's replies and
the sampler's streams. ``EnvStepper`` runs a synchronous ``step`` in the tenant's own worker thread
(one thread: a tenant's steps never run concurrently with each other, as on the loop) and awaits
an ``async def step`` on the loop; either way the answer must come within ``timeout_s``.

A timed-out synchronous step cannot be stopped (Python threads cannot be killed): it keeps the
tenant's thread until it returns, so that tenant's later steps time out too and only that tenant
fails (or retries, see ``ExperimentConfig.retries``). A step that burns CPU in pure Python still
shares the GIL with the loop: it slows the others down but does not stall them.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["EnvStepTimeout", "EnvStepper", "step_on_loop"]


class EnvStepTimeout(TimeoutError):
    """An env step did not return within its deadline."""


async def step_on_loop(episode: Any, text: str) -> Any:
    """Call ``episode.step(text)`` on the event loop (awaiting it if it is async): no thread, no deadline."""
    outcome = episode.step(text)
    if inspect.isawaitable(outcome):
        outcome = await outcome
    return outcome


class EnvStepper:
    """Calls ``episode.step(text)`` for one tenant: sync steps in its thread, async ones on the loop,
    each within ``timeout_s`` seconds (0: no deadline). ``close()`` lets the thread go."""

    def __init__(self, tenant: str, timeout_s: float) -> None:
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 (0: none), got {timeout_s}")
        self.tenant = tenant
        self.timeout_s = timeout_s
        self._thread: ThreadPoolExecutor | None = None  # made at the first synchronous step

    async def __call__(self, episode: Any, text: str) -> Any:
        deadline = asyncio.timeout(self.timeout_s or None)
        try:
            async with deadline:
                return await self._step(episode, text)
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the step raised itself
                raise EnvStepTimeout(f"did not return within {self.timeout_s:g} s (env.step_timeout_s)") from None
            raise

    async def _step(self, episode: Any, text: str) -> Any:
        if inspect.iscoroutinefunction(episode.step):
            return await episode.step(text)
        outcome = await asyncio.get_running_loop().run_in_executor(self._executor(), episode.step, text)
        if inspect.isawaitable(outcome):  # a plain def that returned an awaitable
            outcome = await outcome
        return outcome

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clora-env-{self.tenant}")
        return self._thread

    def close(self) -> None:
        """Release the thread; a step still running in it finishes there, unawaited."""
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None
