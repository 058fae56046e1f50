"""Actor kernel: supervision policies ISOLATE, ESCALATE and RESTART."""

import asyncio
import time

import msgspec
import pytest
from structlog.testing import capture_logs

from actors import (
    Actor,
    ActorConfigError,
    ActorCrashed,
    ActorState,
    ActorStopped,
    ActorSystem,
    Supervision,
    events,
    handler,
)
from clora.testing import until

pytestmark = pytest.mark.timeout(10)


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Crash(msgspec.Struct, frozen=True, tag=True):
    text: str


class Park(msgspec.Struct, frozen=True, tag=True):
    pass


class Fragile(Actor):
    mailbox_size = 4
    instances: list["Fragile"] = []

    def __init__(self) -> None:
        self.hooks: list[str] = []
        self.pings = 0
        Fragile.instances.append(self)

    async def on_stop(self) -> None:
        self.hooks.append("on_stop")

    async def on_failure(self, exc: BaseException) -> None:
        self.hooks.append(f"on_failure:{exc}")

    @handler
    async def ping(self, msg: Ping) -> int:
        self.pings += 1
        return len(Fragile.instances)

    @handler
    async def crash(self, msg: Crash) -> None:
        raise ValueError(msg.text)

    @handler(concurrent=True)
    async def park(self, msg: Park) -> None:
        await asyncio.Event().wait()


@pytest.fixture(autouse=True)
def _fresh_instances():
    Fragile.instances = []


async def test_isolate_marks_the_crashed_actor_dead_and_siblings_keep_running():
    with capture_logs() as logs:
        async with ActorSystem("t") as system:
            sibling = await system.start(Fragile(), name="sibling", supervision=Supervision.ISOLATE)
            victim_actor = Fragile()
            victim = await system.start(victim_actor, name="victim", supervision=Supervision.ISOLATE)
            parked = asyncio.create_task(victim.ask(Park()))
            await asyncio.sleep(0.01)
            await victim.tell(Crash(text="kaputt"))
            await until(lambda: victim.state is ActorState.DEAD)
            assert isinstance(victim.failure, ValueError) and str(victim.failure) == "kaputt"
            assert victim_actor.hooks == ["on_failure:kaputt"]  # on_failure, never on_stop
            with pytest.raises(ActorCrashed, match="'victim' crashed: ValueError: kaputt"):
                await parked  # an ask interrupted by the crash learns why
            with pytest.raises(ActorStopped, match="'victim' is dead: it crashed") as info:
                await victim.ask(Ping())
            assert isinstance(info.value.__cause__, ValueError)
            assert await sibling.ask(Ping()) == 2 and sibling.state is ActorState.RUNNING
    failed = [e for e in logs if e["event"] == events.ACTOR_FAILED]
    assert [(e["actor"], e["action"]) for e in failed] == [("victim", "isolate")]
    assert sibling.state is ActorState.STOPPED


async def test_escalate_stops_everything_and_leaves_the_system():
    sibling_actor = Fragile()
    started = time.perf_counter()
    body_finished = False
    with pytest.raises(ActorCrashed, match="'boss' crashed: ValueError: fatal") as info:
        async with ActorSystem("t") as system:
            await system.start(sibling_actor, name="sibling", supervision=Supervision.ISOLATE)
            boss = await system.start(Fragile(), name="boss", supervision=Supervision.ESCALATE)
            await boss.tell(Crash(text="fatal"))
            await asyncio.sleep(5)  # interrupted by the escalation
            body_finished = True
    assert not body_finished and time.perf_counter() - started < 3
    assert isinstance(info.value.cause, ValueError) and info.value.__cause__ is info.value.cause
    assert sibling_actor.hooks == ["on_stop"]  # the sibling was stopped (not crashed)
    assert boss.state is ActorState.DEAD


async def test_escalate_from_a_concurrent_handler_of_a_tell():
    class Flaky(Actor):
        @handler(concurrent=True)
        async def crash(self, msg: Crash) -> None:
            await asyncio.sleep(0.01)
            raise ValueError(msg.text)

    with pytest.raises(ActorCrashed) as info:
        async with asyncio.timeout(5):
            async with ActorSystem("t") as system:
                ref = await system.start(Flaky(), name="flaky")
                await ref.tell(Crash(text="late"))
                await asyncio.Event().wait()
    assert str(info.value.cause) == "late"


async def test_restart_replaces_the_instance_and_keeps_the_mailbox():
    with capture_logs() as logs:
        async with ActorSystem("t") as system:
            ref = await system.start(Fragile, name="f", supervision=Supervision.RESTART, max_restarts=2)
            first = Fragile.instances[0]
            await ref.tell(Crash(text="one"))
            assert await ref.ask(Ping()) == 2  # queued behind the crash, handled by the second instance
            await ref.tell(Crash(text="two"))
            assert await ref.ask(Ping()) == 3
            assert ref.restarts == 2 and ref.state is ActorState.RUNNING
            assert first.hooks == ["on_failure:one"] and first.pings == 0
            assert Fragile.instances[1].hooks == ["on_failure:two"]
            assert Fragile.instances[2].name == "f"
    assert [e["action"] for e in logs if e["event"] == events.ACTOR_FAILED] == ["restart", "restart"]
    assert [e["restarts"] for e in logs if e["event"] == events.ACTOR_RESTARTED] == [1, 2]


async def test_restart_escalates_after_the_limit():
    with pytest.raises(ActorCrashed, match="'f' crashed: ValueError: three"):
        async with asyncio.timeout(5):
            async with ActorSystem("t") as system:
                ref = await system.start(Fragile, name="f", supervision=Supervision.RESTART, max_restarts=2)
                for text in ("one", "two", "three"):
                    await ref.tell(Crash(text=text))
                await asyncio.Event().wait()
    assert len(Fragile.instances) == 3  # the original and two restarts, no fourth


async def test_restart_needs_a_factory():
    async with ActorSystem("t") as system:
        with pytest.raises(ActorConfigError, match="RESTART needs a factory"):
            await system.start(Fragile(), name="f", supervision=Supervision.RESTART)
        ref = await system.start(lambda: Fragile(), name="g", supervision=Supervision.ISOLATE)
        assert await ref.ask(Ping()) == 2
