"""Actor kernel: start, ask/tell, dispatch by type, definition checks, bounded mailboxes."""

import asyncio

import msgspec
import pytest
from structlog.testing import capture_logs

from actors import (
    Actor,
    ActorConfigError,
    ActorDefinitionError,
    ActorError,
    ActorState,
    ActorSystem,
    UnknownMessage,
    events,
    handler,
)
from clora.testing import until

pytestmark = pytest.mark.timeout(10)


class Add(msgspec.Struct, frozen=True, tag=True):
    x: int


class Fail(msgspec.Struct, frozen=True, tag=True):
    text: str


class Hold(msgspec.Struct, frozen=True, tag=True):
    label: str


class Echo(msgspec.Struct, frozen=True, tag=True):
    text: str


class Shout(msgspec.Struct, frozen=True, tag=True):
    text: str


class NotHandled(msgspec.Struct, frozen=True, tag=True):
    pass


class Counter(Actor):
    mailbox_size = 2

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.total = 0
        self.seen: list[str] = []
        self.gate = gate

    @handler
    async def add(self, msg: Add) -> int:
        self.total += msg.x
        self.seen.append(f"add{msg.x}")
        return self.total

    @handler
    async def fail(self, msg: Fail) -> None:
        raise ValueError(msg.text)

    @handler
    async def hold(self, msg: Hold) -> str:
        self.seen.append(msg.label)
        assert self.gate is not None
        await self.gate.wait()
        return msg.label

    @handler
    async def either(self, msg: Echo | Shout) -> str:
        return msg.text.upper() if isinstance(msg, Shout) else msg.text


class SlowStart(Actor):
    def __init__(self) -> None:
        self.ready = False

    async def on_start(self) -> None:
        await asyncio.sleep(0.05)
        self.ready = True

    @handler
    async def is_ready(self, msg: Echo) -> bool:
        return self.ready


class BrokenStart(Actor):
    async def on_start(self) -> None:
        raise RuntimeError("no engine here")


async def test_start_returns_after_on_start_and_ask_returns_the_handler_value():
    async with ActorSystem("t") as system:
        actor = SlowStart()
        ref = await system.start(actor, name="slow")
        assert actor.ready  # start() waited for on_start
        assert ref.state is ActorState.RUNNING and actor.name == "slow"
        assert await ref.ask(Echo(text="?")) is True
        counter = await system.start(Counter(), name="counter")
        assert await counter.ask(Add(x=2)) == 2
        assert await counter.ask(Add(x=3)) == 5
        assert await counter.ask(Shout(text="hi")) == "HI"  # a union annotation dispatches each member
        assert await counter.ask(Echo(text="hi")) == "hi"


async def test_failing_on_start_raises_to_the_caller_and_frees_the_name():
    with capture_logs() as logs:
        async with ActorSystem("t") as system:
            with pytest.raises(RuntimeError, match="no engine here"):
                await system.start(BrokenStart(), name="broken")
            assert "broken" not in system.actors
            ref = await system.start(Counter(), name="broken")  # the name is free again
            assert await ref.ask(Add(x=1)) == 1
    failed = [e for e in logs if e["event"] == events.ACTOR_START_FAILED]
    assert len(failed) == 1 and failed[0]["actor"] == "broken" and "no engine here" in failed[0]["error"]


async def test_handler_error_reaches_the_asker_and_the_actor_survives():
    async with ActorSystem("t") as system:
        ref = await system.start(Counter(), name="counter")
        with pytest.raises(ValueError, match="bad input"):
            await ref.ask(Fail(text="bad input"))
        assert ref.state is ActorState.RUNNING
        assert await ref.ask(Add(x=4)) == 4
        assert ref.stats.processed == 2


async def test_unknown_message_type_is_a_clear_error_for_ask_and_tell():
    async with ActorSystem("t") as system:
        ref = await system.start(Counter(), name="counter")
        with pytest.raises(UnknownMessage, match=r"'counter' has no handler for NotHandled; it accepts: Add, "):
            await ref.ask(NotHandled())
        with pytest.raises(TypeError):  # UnknownMessage is also a TypeError
            await ref.tell(NotHandled())
        with pytest.raises(UnknownMessage):
            await ref.tell({"x": 1})  # not a Struct at all
        assert ref.stats.depth == 0 and ref.stats.peak == 0  # nothing was enqueued
        assert await ref.ask(Add(x=1)) == 1


async def test_full_mailbox_blocks_senders_in_order_until_drained():
    gate = asyncio.Event()
    actor = Counter(gate)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="counter")
        await ref.tell(Hold(label="first"))  # taken at once, then the handler waits on the gate
        await until(lambda: actor.seen == ["first"])
        await ref.tell(Add(x=1))
        await ref.tell(Add(x=2))  # mailbox (2 slots) is full now
        blocked_a = asyncio.create_task(ref.tell(Add(x=3)))
        await asyncio.sleep(0.02)
        blocked_b = asyncio.create_task(ref.tell(Add(x=4)))
        await asyncio.sleep(0.02)
        assert not blocked_a.done() and not blocked_b.done()
        stats = ref.stats
        assert (stats.depth, stats.peak, stats.waiting_senders, stats.capacity) == (2, 2, 2, 2)
        gate.set()
        async with asyncio.timeout(2):
            await blocked_a
            await blocked_b
        assert await ref.ask(Add(x=0)) == 10
        assert actor.seen == ["first", "add1", "add2", "add3", "add4", "add0"]  # senders kept their order
        stats = ref.stats
        assert (stats.depth, stats.peak, stats.waiting_senders, stats.processed) == (0, 2, 0, 6)


async def test_cancelled_blocked_sender_enqueues_nothing():
    gate = asyncio.Event()
    actor = Counter(gate)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="counter", mailbox_size=1)
        await ref.tell(Hold(label="first"))
        await until(lambda: actor.seen == ["first"])
        await ref.tell(Add(x=1))
        blocked = asyncio.create_task(ref.tell(Add(x=100)))
        await asyncio.sleep(0.02)
        assert ref.stats.waiting_senders == 1
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert ref.stats.waiting_senders == 0
        gate.set()
        assert await ref.ask(Add(x=2)) == 3  # the cancelled Add(100) never got in
        assert actor.seen == ["first", "add1", "add2"]


async def test_mailbox_size_below_one_is_rejected():
    with pytest.raises(ActorConfigError, match="mailbox_size must be an int >= 1"):

        class Unbounded(Actor):
            mailbox_size = 0

    assert issubclass(ActorConfigError, ValueError)
    async with ActorSystem("t") as system:
        with pytest.raises(ActorConfigError):
            await system.start(Counter(), name="c", mailbox_size=0)
        assert system.actors == {}


def test_handler_signatures_are_checked_when_the_class_is_created():
    with pytest.raises(ActorDefinitionError, match="must be an 'async def'"):

        class SyncHandler(Actor):
            @handler
            def add(self, msg: Add) -> None: ...

    with pytest.raises(ActorDefinitionError, match="annotate 'msg'"):

        class NoAnnotation(Actor):
            @handler
            async def add(self, msg) -> None: ...

    with pytest.raises(ActorDefinitionError, match="not a msgspec.Struct"):

        class NotAStruct(Actor):
            @handler
            async def add(self, msg: int) -> None: ...

    with pytest.raises(ActorDefinitionError, match="exactly"):

        class TwoParams(Actor):
            @handler
            async def add(self, msg: Add, extra: int) -> None: ...

    with pytest.raises(ActorDefinitionError, match="Add has two handlers"):

        class Twice(Actor):
            @handler
            async def one(self, msg: Add) -> None: ...

            @handler
            async def two(self, msg: Add | Echo) -> None: ...

    with pytest.raises(ActorDefinitionError, match=r"no handler for \['Echo'\]"):

        class MissingInbox(Actor):
            inbox = Add | Echo

            @handler
            async def add(self, msg: Add) -> None: ...

    with pytest.raises(ActorDefinitionError, match="max_concurrency only applies"):
        handler(max_concurrency=2)

    with pytest.raises(ActorDefinitionError, match="on_start must be an 'async def'"):

        class SyncHook(Actor):
            def on_start(self) -> None: ...


def test_subclass_inherits_and_overrides_handlers():
    class Base(Actor):
        @handler
        async def add(self, msg: Add) -> str:
            return "base"

        @handler
        async def echo(self, msg: Echo) -> str:
            return "base"

    class Child(Base):
        @handler
        async def add(self, msg: Add) -> str:  # replaces Base.add
            return "child"

        async def echo(self, msg: Echo) -> str:  # not a handler any more
            return "plain"

    assert Child.__handlers__[Add].func is Child.__dict__["add"]
    assert Echo not in Child.__handlers__
    assert Base.__handlers__[Echo].name == "echo"


async def test_sequential_handler_asking_its_own_actor_fails_instead_of_hanging():
    class Selfish(Actor):
        @handler
        async def echo(self, msg: Echo) -> str:
            return await self.ref.ask(Shout(text=msg.text))

        @handler
        async def shout(self, msg: Shout) -> str:
            return msg.text.upper()

    async with ActorSystem("t") as system:
        ref = await system.start(Selfish(), name="selfish")
        with pytest.raises(ActorError, match="would wait forever"):
            await ref.ask(Echo(text="x"))
        assert await ref.ask(Shout(text="y")) == "Y"


async def test_an_instance_runs_once_and_names_are_unique():
    async with ActorSystem("t") as system:
        actor = Counter()
        await system.start(actor, name="a")
        with pytest.raises(ActorConfigError, match="already runs an actor named 'a'"):
            await system.start(Counter(), name="a")
        with pytest.raises(ActorConfigError, match="already started"):
            await system.start(actor, name="b")


async def test_lifecycle_events_carry_the_actor_name():
    with capture_logs() as logs:
        async with ActorSystem("sys") as system:
            ref = await system.start(Counter(), name="counter")
            await ref.ask(Add(x=1))
    names = [(e["event"], e.get("actor")) for e in logs]
    assert (events.ACTOR_STARTED, "counter") in names
    assert (events.ACTOR_STOPPED, "counter") in names
    stopped = next(e for e in logs if e["event"] == events.ACTOR_STOPPED)
    assert stopped["system"] == "sys" and stopped["mode"] == "drain" and stopped["processed"] == 1
