"""Actor kernel: cancelling an ask removes that message only; concurrent handlers and their bound."""

import asyncio

import msgspec
import pytest

from actors import Actor, ActorState, ActorSystem, handler
from clora.testing import until

pytestmark = pytest.mark.timeout(10)


class Step(msgspec.Struct, frozen=True, tag=True):
    label: str
    seconds: float = 0.0


class Fetch(msgspec.Struct, frozen=True, tag=True):
    label: str
    seconds: float


class Limited(msgspec.Struct, frozen=True, tag=True):
    seconds: float


class Trainerish(Actor):
    mailbox_size = 8

    def __init__(self) -> None:
        self.done: list[str] = []
        self.started: list[str] = []
        self.cleaned: list[str] = []
        self.gate = asyncio.Event()
        self.active = 0
        self.peak_active = 0

    @handler
    async def step(self, msg: Step) -> str:
        self.started.append(msg.label)
        if msg.label == "gated":
            await self.gate.wait()
        await asyncio.sleep(msg.seconds)
        self.done.append(msg.label)  # a step is never half-done
        return msg.label

    @handler(concurrent=True)
    async def fetch(self, msg: Fetch) -> str:
        self.started.append(msg.label)
        try:
            await asyncio.sleep(msg.seconds)
        finally:
            self.cleaned.append(msg.label)
        self.done.append(msg.label)
        return msg.label

    @handler(concurrent=True, max_concurrency=2)
    async def limited(self, msg: Limited) -> int:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            await asyncio.sleep(msg.seconds)
        finally:
            self.active -= 1
        return self.peak_active


async def test_cancelling_a_queued_ask_drops_only_that_message():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="trainer")
        gated = asyncio.create_task(ref.ask(Step(label="gated")))
        await until(lambda: actor.started == ["gated"])
        before = asyncio.create_task(ref.ask(Step(label="before")))
        await asyncio.sleep(0.01)
        victim = asyncio.create_task(ref.ask(Step(label="victim")))
        await asyncio.sleep(0.01)
        after = asyncio.create_task(ref.ask(Step(label="after")))
        await asyncio.sleep(0.01)
        assert ref.stats.depth == 3
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert ref.stats.depth == 2  # removed from the mailbox at once
        actor.gate.set()
        assert await asyncio.gather(gated, before, after) == ["gated", "before", "after"]
        assert actor.done == ["gated", "before", "after"]  # the victim never ran


async def test_timing_out_an_ask_on_a_running_sequential_handler_lets_it_finish():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="trainer")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await ref.ask(Step(label="long", seconds=0.15))
        assert actor.started == ["long"] and actor.done == []
        assert await ref.ask(Step(label="next")) == "next"  # queued behind the still-running step
        assert actor.done == ["long", "next"]
        assert ref.state is ActorState.RUNNING and ref.stats.processed == 2


async def test_cancelling_an_ask_cancels_its_concurrent_task_and_nothing_else():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="sampler")
        victim = asyncio.create_task(ref.ask(Fetch(label="victim", seconds=5)))
        survivor = asyncio.create_task(ref.ask(Fetch(label="survivor", seconds=0.1)))
        await until(lambda: sorted(actor.started) == ["survivor", "victim"])
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await until(lambda: "victim" in actor.cleaned)  # its task was cancelled and its cleanup ran
        assert "victim" not in actor.done
        assert await survivor == "survivor"  # the other handler task was untouched
        assert await ref.ask(Step(label="after")) == "after"
        assert ref.state is ActorState.RUNNING


async def test_concurrent_handlers_overlap_while_the_mailbox_keeps_draining():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="sampler")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(*(ref.ask(Fetch(label=str(i), seconds=0.2)) for i in range(5)))
        assert results == [str(i) for i in range(5)]
        assert loop.time() - t0 < 0.6  # 5 x 0.2 s handlers ran at the same time, not one after another


async def test_max_concurrency_bounds_running_handlers():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="bounded")
        peaks = await asyncio.gather(*(ref.ask(Limited(seconds=0.03)) for _ in range(6)))
        assert max(peaks) == 2 == actor.peak_active
        assert actor.active == 0


async def test_cancelling_an_ask_waiting_for_a_concurrency_slot_drops_it():
    async with ActorSystem("t") as system:
        actor = Trainerish()
        ref = await system.start(actor, name="bounded")
        running = [asyncio.create_task(ref.ask(Limited(seconds=0.1))) for _ in range(2)]
        await until(lambda: actor.active == 2)
        waiting = asyncio.create_task(ref.ask(Limited(seconds=0.1)))  # taken from the mailbox, waits for a slot
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.gather(*running)
        assert await ref.ask(Limited(seconds=0.0)) == 2
        assert ref.stats.processed == 3  # the cancelled one never ran
