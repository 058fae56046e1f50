"""EnvStepper: a tenant's env steps run off the event loop, one at a time, under a deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from clora.envs.stepping import EnvStepper, EnvStepTimeout

pytestmark = pytest.mark.timeout(30)


class BlockingEpisode:
    """A synchronous step that blocks until ``release`` is set (a hung tool)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: set[str] = set()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def step(self, text: str) -> str:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.threads.add(threading.current_thread().name)
        try:
            self.release.wait(timeout=10)
            return f"done {text}"
        finally:
            with self._lock:
                self.running -= 1


class AsyncEpisode:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def step(self, text: str) -> str:
        await asyncio.sleep(self.delay_s)
        return f"async {text}"


class SelfTimingOut:
    def step(self, text: str) -> str:
        raise TimeoutError("the tool's own socket timed out")


async def _ticks_during(coro) -> tuple[object, int]:
    """Run ``coro`` and count how often the loop got to run another task meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        result = await coro
    finally:
        ticker.cancel()
    return result, ticks


async def test_a_sync_step_runs_in_the_tenants_thread_and_the_loop_stays_free():
    stepper = EnvStepper("t1", timeout_s=5)
    episode = BlockingEpisode()
    asyncio.get_running_loop().call_later(0.5, episode.release.set)
    result, ticks = await _ticks_during(stepper(episode, "x"))
    assert result == "done x" and ticks >= 5  # the loop ran other work while the step blocked (~50 ticks idle)
    assert episode.threads == {"clora-env-t1_0"}
    stepper.close()


async def test_a_tenants_steps_never_overlap():
    stepper = EnvStepper("t1", timeout_s=5)
    episode = BlockingEpisode()
    episode.release.set()
    results = await asyncio.gather(*(stepper(episode, str(i)) for i in range(6)))
    assert results == [f"done {i}" for i in range(6)] and episode.most_running == 1
    stepper.close()


async def test_a_hung_step_times_out_and_stalls_only_its_own_tenant():
    stuck, healthy = EnvStepper("stuck", timeout_s=0.3), EnvStepper("healthy", timeout_s=5)
    hung = BlockingEpisode()
    started = time.perf_counter()
    with pytest.raises(EnvStepTimeout, match=r"did not return within 0.3 s \(env.step_timeout_s\)"):
        await stuck(hung, "x")
    assert 0.25 < time.perf_counter() - started < 2
    ok = BlockingEpisode()
    ok.release.set()
    assert await healthy(ok, "y") == "done y"  # another tenant's thread is free
    with pytest.raises(EnvStepTimeout):  # the stuck tenant's thread is still busy: its next step waits and times out
        await stuck(ok, "z")
    hung.release.set()
    for stepper in (stuck, healthy):
        stepper.close()


async def test_async_steps_run_on_the_loop_under_the_same_deadline():
    stepper = EnvStepper("t", timeout_s=0.2)
    assert await stepper(AsyncEpisode(0.01), "a") == "async a"
    with pytest.raises(EnvStepTimeout):
        await stepper(AsyncEpisode(5), "b")
    assert await EnvStepper("t", timeout_s=0)(AsyncEpisode(0.3), "c") == "async c"  # 0: no deadline


async def test_a_timeout_the_step_raised_itself_is_not_called_a_deadline():
    with pytest.raises(TimeoutError, match="own socket") as caught:
        await EnvStepper("t", timeout_s=5)(SelfTimingOut(), "x")
    assert not isinstance(caught.value, EnvStepTimeout)


def test_a_negative_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        EnvStepper("t", timeout_s=-1)
