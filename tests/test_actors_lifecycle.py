"""Actor kernel: stop (drain vs abort), asks after a stop, shutdown order, shutdown that never hangs."""

import asyncio
import time

import msgspec
import pytest

from actors import Actor, ActorState, ActorStopped, ActorSystem, Supervision, handler
from clora.testing import until

pytestmark = pytest.mark.timeout(10)


class Work(msgspec.Struct, frozen=True, tag=True):
    label: str


class Block(msgspec.Struct, frozen=True, tag=True):
    label: str


class Spin(msgspec.Struct, frozen=True, tag=True):
    pass


class Worker(Actor):
    mailbox_size = 8

    def __init__(self, journal: list[str] | None = None) -> None:
        self.gate = asyncio.Event()
        self.journal = journal if journal is not None else []
        self.cleanups: list[str] = []

    async def on_stop(self) -> None:
        self.journal.append(f"{self.name}:on_stop")

    async def on_failure(self, exc: BaseException) -> None:
        self.journal.append(f"{self.name}:on_failure")

    @handler
    async def work(self, msg: Work) -> str:
        self.journal.append(f"{self.name}:{msg.label}")
        return msg.label

    @handler
    async def block(self, msg: Block) -> str:
        self.journal.append(f"{self.name}:{msg.label}")
        try:
            await self.gate.wait()
        finally:
            self.cleanups.append(msg.label)
        return msg.label

    @handler(concurrent=True)
    async def spin(self, msg: Spin) -> None:
        try:
            while True:
                await asyncio.sleep(0.01)
        finally:
            self.cleanups.append("spin")


async def test_drain_handles_everything_queued_then_calls_on_stop():
    async with ActorSystem("t") as system:
        actor = Worker()
        ref = await system.start(actor, name="w")
        first = asyncio.create_task(ref.ask(Block(label="b")))
        await until(lambda: actor.journal == ["w:b"])
        queued_ask = asyncio.create_task(ref.ask(Work(label="asked")))
        await asyncio.sleep(0.01)
        await ref.tell(Work(label="told"))
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(system.stop(ref, mode="drain"))
        await asyncio.sleep(0.02)
        assert ref.state is ActorState.STOPPING and not stopping.done()
        with pytest.raises(ActorStopped, match="'w' is stopped; Work was not accepted"):
            await ref.tell(Work(label="late"))  # nothing new gets in while draining
        actor.gate.set()
        await stopping
        assert await first == "b" and await queued_ask == "asked"
        assert actor.journal == ["w:b", "w:asked", "w:told", "w:on_stop"]
        assert ref.state is ActorState.STOPPED and ref.stats.processed == 3


async def test_abort_cancels_the_running_handler_and_fails_queued_asks():
    async with ActorSystem("t") as system:
        actor = Worker()
        ref = await system.start(actor, name="w")
        running = asyncio.create_task(ref.ask(Block(label="b")))
        await until(lambda: actor.journal == ["w:b"])
        queued = asyncio.create_task(ref.ask(Work(label="queued")))
        await ref.tell(Work(label="told"))
        await asyncio.sleep(0.01)
        assert ref.stats.depth == 2
        await system.stop(ref, mode="abort")
        with pytest.raises(ActorStopped, match="'w' is stopped; Block was interrupted"):
            await running
        with pytest.raises(ActorStopped, match="'w' is stopped; Work was not handled"):
            await queued
        assert actor.cleanups == ["b"]  # the running handler was cancelled and cleaned up
        assert actor.journal == ["w:b", "w:on_stop"]  # queued messages never ran; on_stop did
        assert ref.state is ActorState.STOPPED and ref.stats.processed == 0


async def test_asks_and_tells_after_stop_fail_with_actor_stopped():
    async with ActorSystem("t") as system:
        ref = await system.start(Worker(), name="worker-7")
        await system.stop(ref)
        with pytest.raises(ActorStopped, match="'worker-7' is stopped; Work was not accepted") as info:
            await ref.ask(Work(label="x"))
        assert info.value.actor == "worker-7" and isinstance(info.value, RuntimeError)
        with pytest.raises(ActorStopped):
            await ref.tell(Work(label="x"))
        await system.stop(ref)  # stopping again is a no-op
        await system.stop(ref, mode="abort")


async def test_blocked_senders_fail_when_the_actor_stops():
    async with ActorSystem("t") as system:
        actor = Worker()
        ref = await system.start(actor, name="w", mailbox_size=1)
        await ref.tell(Block(label="b"))
        await until(lambda: actor.journal == ["w:b"])
        await ref.tell(Work(label="fills"))
        blocked = asyncio.create_task(ref.tell(Work(label="blocked")))
        await asyncio.sleep(0.02)
        assert ref.stats.waiting_senders == 1
        await system.stop(ref, mode="abort")
        with pytest.raises(ActorStopped):
            await blocked


async def test_exit_stops_actors_in_reverse_start_order_after_draining():
    journal: list[str] = []
    async with ActorSystem("t") as system:
        a = await system.start(Worker(journal), name="a")
        b = await system.start(Worker(journal), name="b")
        c = await system.start(Worker(journal), name="c")
        for ref in (a, b, c):
            await ref.tell(Work(label="last"))
    assert journal[-3:] == ["c:on_stop", "b:on_stop", "a:on_stop"]
    assert sorted(journal[:3]) == ["a:last", "b:last", "c:last"]  # drained before stopping
    assert all(r.state is ActorState.STOPPED for r in (a, b, c))


async def test_start_after_shutdown_is_refused():
    from actors import SystemNotRunning

    async with ActorSystem("t") as system:
        await system.shutdown()
        with pytest.raises(SystemNotRunning, match="not running"):
            await system.start(Worker(), name="late")


async def test_shutdown_does_not_hang_with_busy_actors_when_cancelled():
    actors = [Worker() for _ in range(3)]
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            async with ActorSystem("t") as system:
                refs = [await system.start(a, name=f"busy{i}", mailbox_size=1) for i, a in enumerate(actors)]
                senders = []
                for ref in refs:
                    await ref.tell(Spin())
                    await ref.tell(Spin())
                    await ref.tell(Block(label="b"))  # a sequential handler that never finishes
                    await ref.tell(Work(label="queued"))  # fills the one slot
                    senders.append(asyncio.create_task(ref.tell(Work(label="stuck"))))  # blocked sender
                await until(lambda: all(r.stats.waiting_senders == 1 for r in refs))
                await asyncio.Event().wait()  # the body never ends on its own
    assert time.perf_counter() - started < 3
    for actor in actors:
        assert sorted(actor.cleanups) == ["b", "spin", "spin"]  # every running handler was cancelled
        assert actor.journal[-1].endswith(":on_stop")
    for sender in senders:
        assert isinstance(sender.exception(), ActorStopped)


async def test_shutdown_does_not_hang_when_the_body_raises():
    actor = Worker()
    with pytest.raises(KeyError):
        async with asyncio.timeout(5):
            async with ActorSystem("t") as system:
                ref = await system.start(actor, name="busy")
                await ref.tell(Block(label="forever"))
                await until(lambda: actor.journal == ["busy:forever"])
                raise KeyError("body failed")
    assert actor.cleanups == ["forever"] and actor.journal[-1] == "busy:on_stop"


async def test_on_stop_error_reaches_the_caller_of_stop():
    class BadStop(Worker):
        async def on_stop(self) -> None:
            raise OSError("cleanup failed")

    async with ActorSystem("t") as system:
        ref = await system.start(BadStop(), name="bad")
        with pytest.raises(OSError, match="cleanup failed"):
            await system.stop(ref)
        assert ref.state is ActorState.STOPPED


class Forever(Actor):
    def __init__(self) -> None:
        self.interrupted = False

    async def on_start(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.interrupted = True
            raise

    async def on_stop(self) -> None:
        raise AssertionError("on_stop must not run for an actor that never started")


async def test_cancelled_start_interrupts_on_start_and_leaves_no_actor():
    async with ActorSystem("t") as system:
        actor = Forever()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await system.start(actor, name="forever")
        await until(lambda: "forever" not in system.actors)
        assert actor.interrupted
        ref = await system.start(Worker(), name="forever")  # name is free, system fine
        assert await ref.ask(Work(label="x")) == "x"


class Quitter(Actor):
    def __init__(self) -> None:
        self.stopped = False

    async def on_stop(self) -> None:
        self.stopped = True

    @handler
    async def work(self, msg: Work) -> str:
        await self.system_ref.stop(self.ref)  # only requests the stop: waiting would never end
        return "bye"


async def test_an_actor_can_stop_itself_from_a_handler():
    async with ActorSystem("t") as system:
        actor = Quitter()
        actor.system_ref = system
        ref = await system.start(actor, name="quitter")
        assert await ref.ask(Work(label="x")) == "bye"
        await until(lambda: ref.state is ActorState.STOPPED)
        assert actor.stopped


async def test_telling_itself_into_a_full_mailbox_fails_instead_of_hanging():
    from actors import ActorError

    class Looper(Actor):
        mailbox_size = 1

        @handler
        async def work(self, msg: Work) -> None:
            for _ in range(3):
                await self.ref.tell(Block(label="again"))

        @handler
        async def block(self, msg: Block) -> None:
            pass

    async with ActorSystem("t") as system:
        ref = await system.start(Looper(), name="looper", supervision=Supervision.ISOLATE)
        await ref.tell(Work(label="go"))
        await until(lambda: ref.state is ActorState.DEAD)
        assert isinstance(ref.failure, ActorError) and "would wait forever" in str(ref.failure)
