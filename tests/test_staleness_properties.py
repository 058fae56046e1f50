"""Property tests of the staleness bound (hypothesis): the tenant's pipeline never lets a step train
on a version more than k newer than any it sampled with, whatever the delays; the trainer's screen
keeps exactly the data within the bound. Pure asyncio and pure functions: milliseconds per example.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clora.messages import Datum, TrainStep
from clora.tenant.pipeline import pipelined
from clora.trainer.staleness import screen

DATUM = Datum(tokens=[1, 2], loss_mask=[0.0, 1.0], advantages=[0.0, 1.0], sampler_logprobs=[0.0, -1.0])


class World:
    """A trainer version, the version serving in the engine, and what each step trained on."""

    def __init__(self, delays: list[float], skips: list[bool]) -> None:
        self.version = 0  # the trainer's
        self.published = 0  # the engine's
        self._delays = iter(delays * 100)
        self._skips = iter(skips * 100)
        self.trained: list[tuple[int, int, int]] = []  # (step, u, v)
        self.in_flight_max = 0
        self._in_flight = 0

    async def pause(self) -> None:
        await asyncio.sleep(next(self._delays))

    async def rollout(self, step: int) -> int:
        """Samples a few turns at random times; returns the oldest version it saw."""
        self._in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self._in_flight)
        try:
            seen = []
            for _ in range(3):
                seen.append(self.published)
                await self.pause()
            return min(seen)
        finally:
            self._in_flight -= 1

    async def train(self, step: int, sampled_with: int) -> int:
        await self.pause()
        self.trained.append((step, self.version, sampled_with))
        if not next(self._skips):  # a step with no signal trains nothing and publishes nothing
            self.version += 1
            await self.pause()
            self.published = self.version
        return self.version


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ahead=st.integers(0, 3),
    steps=st.integers(1, 8),
    delays=st.lists(st.sampled_from([0.0, 0.0005, 0.001, 0.003]), min_size=1, max_size=12),
    skips=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_the_pipeline_never_trains_past_the_bound(ahead, steps, delays, skips):
    world = World(delays, skips)

    async def run() -> list[int]:
        done = []
        async for step, _ in pipelined(1, steps, ahead, lambda s: world.rollout(s), world.train):
            done.append(step)
        return done

    assert asyncio.run(run()) == list(range(1, steps + 1))  # every step, in order
    assert [s for s, _, _ in world.trained] == list(range(1, steps + 1))
    assert all(u - v <= ahead for _, u, v in world.trained), world.trained
    assert world.in_flight_max <= ahead + 1
    if ahead == 0:  # synchronous: always on-policy
        assert all(u == v for _, u, v in world.trained)


def test_the_pipeline_overlaps_and_reaches_the_bound():
    """The bound is also reached (not just respected): with slow training the rollouts run ahead."""
    world = World([0.002], [False])
    asyncio.run(_drain(pipelined(1, 6, 2, lambda s: world.rollout(s), world.train)))
    assert max(u - v for _, u, v in world.trained) == 2 and world.in_flight_max == 3


async def _drain(steps) -> None:
    async for _ in steps:
        pass


async def test_leaving_the_pipeline_cancels_the_rollouts_in_flight():
    started, cancelled = [], []

    async def rollout(step: int) -> int:
        started.append(step)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(step)
            raise
        return 0

    async def train(step: int, _: int) -> int:
        raise AssertionError("never reached")

    steps = pipelined(1, 5, 2, rollout, train)
    first = asyncio.ensure_future(steps.__anext__())
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert started == [1, 2, 3] and sorted(cancelled) == [1, 2, 3]


@given(
    version=st.integers(0, 20),
    k=st.integers(0, 5),
    ages=st.lists(st.integers(0, 8), min_size=1, max_size=10),
    policy=st.sampled_from(["drop", "resample"]),
)
def test_the_trainer_screen_keeps_exactly_the_data_within_the_bound(version, k, ages, policy):
    data = [msgspec.structs.replace(DATUM, sampler_version=max(version - a, 0)) for a in ages]
    seen = screen(TrainStep(tenant="t", data=data, max_staleness=k, stale_policy=policy), version)
    stale = [i for i, d in enumerate(data) if version - d.sampler_version > k]
    assert list(seen.dropped) == stale or (seen.error is not None and list(seen.error.stale) == stale)
    if seen.msg is not None:
        assert all(version - d.sampler_version <= k for d in seen.msg.data)
        assert len(seen.msg.data) == len(data) - len(stale) and sum(seen.staleness.values()) == len(seen.msg.data)
        assert policy == "drop" or not stale
    else:
        assert stale and (policy == "resample" or len(stale) == len(data))
