"""ActorCell: one actor's life inside the system's task group.

The cell runs as one task of the system's TaskGroup: on_start, then a serving phase (a loop
task plus one task per running concurrent handler, all in the cell's own TaskGroup), then
on_stop (clean stop) or on_failure plus the supervision policy (crash). Handler errors never
travel through the TaskGroup: the cell catches them and decides, so cancellation stays exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from actors import events
from actors.actor import Actor
from actors.errors import ActorConfigError, ActorCrashed
from actors.handlers import HandlerSpec
from actors.lifecycle import ActorState, StopMode, Supervision
from actors.mailbox import Envelope, Mailbox
from actors.ref import ActorRef

__all__ = ["ActorCell"]


class ActorCell:
    def __init__(
        self,
        name: str,
        first: Actor,
        factory: Callable[[], Actor] | None,
        supervision: Supervision,
        max_restarts: int,
        mailbox_size: int,
        log: Any,
    ) -> None:
        self.name = name
        self.supervision = supervision
        self.max_restarts = max_restarts
        self.restarts = 0
        self.log = log
        self.mailbox = Mailbox(name, mailbox_size)
        self.ref: ActorRef[Any] = ActorRef(self)
        self.state = ActorState.STARTING
        self.failure: BaseException | None = None
        self.stop_error: BaseException | None = None  # on_stop raised; stop() re-raises it
        self.task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.started.add_done_callback(_mark_retrieved)
        self.done: asyncio.Future[None] = loop.create_future()
        self._factory = factory
        self._actor = first
        self._live = False  # on_start finished and neither on_stop nor on_failure has begun
        self._stop_mode: StopMode | None = None
        self._crash: BaseException | None = None
        self._group: asyncio.TaskGroup | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._dropped = 0
        self._attach(first)

    # ------------------------------------------------------------------ called by refs and the system

    def handler_for(self, message: Any) -> HandlerSpec:
        return type(self._actor).handler_for(message, self.name)

    def accepts(self, message_type: type) -> bool:
        """Whether a handler takes ``message_type`` (or one of its base classes)."""
        return any(klass in type(self._actor).__handlers__ for klass in message_type.__mro__)

    def is_serving_task(self, task: asyncio.Task[Any] | None) -> bool:
        """True inside this actor's sequential handlers (they run in the mailbox loop's task)."""
        return task is not None and task is self._loop_task

    def is_own_task(self, task: asyncio.Task[Any] | None) -> bool:
        """True inside any of this actor's code: hooks, sequential or concurrent handlers."""
        return task is not None and (task is self.task or task is self._loop_task or task in self._handler_tasks)

    def withdraw(self, envelope: Envelope) -> None:
        """The asker gave up: drop its envelope if queued, cancel its concurrent task if running."""
        if self.mailbox.remove(envelope):
            return
        if envelope.task is not None and not envelope.task.done():
            envelope.task.cancel()

    def request_stop(self, mode: StopMode) -> None:
        """Close the mailbox; "abort" also cancels running handlers and fails queued asks."""
        if self.done.done() or self._stop_mode in ("abort", mode):
            return
        self._stop_mode = mode
        if self.state is ActorState.RUNNING:
            self.state = ActorState.STOPPING
        self.mailbox.close("is stopped")
        if mode != "abort":
            return
        self._fail_queued()
        if self._loop_task is not None:
            self._cancel_serving()
        elif self.task is not None and not self._live and self.state in (ActorState.STARTING, ActorState.RESTARTING):
            self.task.cancel()  # interrupt on_start; run() ends the actor without on_stop

    def on_task_done(self, task: asyncio.Task[None]) -> None:
        """Safety net: whatever ended the task (even a cancel before its first step), settle everyone."""
        self._finish()

    # ------------------------------------------------------------------ the actor task

    async def run(self) -> None:
        try:
            await self._lifecycle()
        except asyncio.CancelledError:
            await self._teardown_cancelled()
            raise
        finally:
            self._finish()

    async def _lifecycle(self) -> None:
        actor = self._actor
        while True:
            try:
                await self._start_instance(actor)
            except Exception as exc:
                if not self.started.done():  # the first on_start failed: the caller of start() gets it
                    self._fail_start(exc)
                    return
                crash: BaseException | None = exc  # a restarted instance failed to start
            else:
                crash = await self._serve(actor)
                if crash is None:
                    await self._stop_instance(actor)
                    return
                await self._notify_failure(actor, crash)
            if self.supervision is not Supervision.RESTART or self._stop_mode is not None:
                self._die(crash)
                return
            if self.restarts >= self.max_restarts:
                self._die(crash, escalate=True)
                return
            try:
                actor = self._next_instance(crash)
            except Exception as exc:
                self._die(exc, escalate=True)
                return

    async def _start_instance(self, actor: Actor) -> None:
        first = not self.started.done()
        self.state = ActorState.STARTING if first else ActorState.RESTARTING
        await actor.on_start()
        self._live = True
        if first:
            self.started.set_result(None)
            self.log.info(
                events.ACTOR_STARTED, mailbox_size=self.mailbox.capacity, supervision=self.supervision.value
            )
        else:
            self.log.info(events.ACTOR_RESTARTED, restarts=self.restarts, max_restarts=self.max_restarts)

    def _fail_start(self, exc: BaseException) -> None:
        self.failure = exc
        self.state = ActorState.DEAD
        self.mailbox.close("failed to start", exc)
        self._fail_queued()
        self.log.error(events.ACTOR_START_FAILED, error=f"{type(exc).__name__}: {exc}")
        self.started.set_exception(exc)

    def _next_instance(self, crash: BaseException) -> Actor:
        """A fresh instance from the factory for the same mailbox (RESTART, under its limit)."""
        self.restarts += 1
        self.state = ActorState.RESTARTING
        self._log_failure(crash, action="restart")
        assert self._factory is not None  # the system refuses RESTART without one
        actor = self._factory()
        if type(actor) is not type(self._actor):
            raise ActorConfigError(
                f"the factory of {self.name!r} returned {type(actor).__qualname__}, "
                f"expected a fresh {type(self._actor).__qualname__}"
            )
        self._attach(actor)
        return actor

    def _die(self, crash: BaseException, escalate: bool | None = None) -> None:
        """No (more) restarts: mark dead, fail what is queued, escalate unless the policy is ISOLATE."""
        if escalate is None:
            escalate = self.supervision is Supervision.ESCALATE
        self.failure = crash
        self.state = ActorState.DEAD
        self.mailbox.close(f"is dead: it crashed ({type(crash).__name__}: {crash})", crash)
        self._fail_queued()
        self._log_failure(crash, action="escalate" if escalate else "isolate")
        if escalate:
            raise ActorCrashed(self.name, crash)

    async def _stop_instance(self, actor: Actor) -> None:
        self.state = ActorState.STOPPING
        self._fail_queued()  # only non-empty after an abort
        self._live = False
        try:
            await actor.on_stop()
        except Exception as exc:
            self.stop_error = exc
            self.log.error(events.ACTOR_HOOK_FAILED, hook="on_stop", error=f"{type(exc).__name__}: {exc}")
        self.state = ActorState.STOPPED
        self.log.info(
            events.ACTOR_STOPPED, mode=self._stop_mode or "drain", processed=self.mailbox.stats().processed,
            dropped=self._dropped,
        )

    async def _notify_failure(self, actor: Actor, crash: BaseException) -> None:
        self._live = False
        try:
            await actor.on_failure(crash)
        except Exception as exc:
            self.log.error(events.ACTOR_HOOK_FAILED, hook="on_failure", error=f"{type(exc).__name__}: {exc}")

    async def _teardown_cancelled(self) -> None:
        """The actor task itself was cancelled (the system is going down, or on_start was aborted)."""
        self._stop_mode = "abort"
        self.mailbox.close("is stopped: its actor system shut down")
        self._fail_queued()
        if self._live:
            await self._stop_instance(self._actor)

    def _finish(self) -> None:
        if self.done.done():
            return
        stats = self.mailbox.stats()  # before close() and _fail_queued() empty it
        self.log.info(
            events.ACTOR_MAILBOX_STATS, depth=stats.depth, peak=stats.peak, capacity=stats.capacity,
            processed=stats.processed, waiting_senders=stats.waiting_senders,
        )
        self.mailbox.close("is stopped")
        self._fail_queued()
        if not self.started.done():
            self.started.set_exception(self.mailbox.stopped_error("its on_start was interrupted"))
        if self.state is not ActorState.DEAD:
            self.state = ActorState.STOPPED
        self.done.set_result(None)

    # ------------------------------------------------------------------ serving

    async def _serve(self, actor: Actor) -> BaseException | None:
        """Take messages until the mailbox is closed and empty (stop) or a crash; return the crash."""
        self._crash = None
        self._slots = {
            spec.name: asyncio.Semaphore(spec.max_concurrency)
            for spec in type(actor).__handlers__.values()
            if spec.max_concurrency is not None
        }
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.state = ActorState.RUNNING if self._stop_mode is None else ActorState.STOPPING
                self._loop_task = group.create_task(self._take_messages(actor), name=f"actor:{self.name}:mailbox")
                if self._stop_mode == "abort":
                    self._cancel_serving()
        except Exception as exc:  # a bug in the loop itself, not a handler error: still a crash
            if self._crash is None:
                self._crash = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
        finally:
            self._group = None
            self._loop_task = None
        return self._crash

    async def _take_messages(self, actor: Actor) -> None:
        while self._crash is None:
            envelope = await self.mailbox.get()
            if envelope is None:
                return
            try:
                if envelope.handler.concurrent:
                    await self._spawn(actor, envelope)
                else:
                    await self._invoke(actor, envelope)
            except asyncio.CancelledError:
                self._fail_reply(envelope)
                raise

    async def _spawn(self, actor: Actor, envelope: Envelope) -> None:
        slots = self._slots.get(envelope.handler.name)
        if slots is not None:
            await slots.acquire()  # the mailbox waits here while the handler is at its bound
        if envelope.reply is not None and envelope.reply.done():  # the asker gave up meanwhile
            if slots is not None:
                slots.release()
            return
        assert self._group is not None
        task = self._group.create_task(
            self._invoke(actor, envelope), name=f"actor:{self.name}:{envelope.handler.name}"
        )
        envelope.task = task
        self._handler_tasks.add(task)
        task.add_done_callback(lambda t: self._on_handler_done(t, envelope, slots))

    def _on_handler_done(self, task: asyncio.Task[None], envelope: Envelope, slots: asyncio.Semaphore | None) -> None:
        self._handler_tasks.discard(task)
        if slots is not None:
            slots.release()
        self._fail_reply(envelope)  # a task cancelled before its first step never ran _invoke

    async def _invoke(self, actor: Actor, envelope: Envelope) -> None:
        reply = envelope.reply
        if reply is not None and reply.done():  # the asker gave up before the handler started
            return
        try:
            result = await envelope.handler.func(actor, envelope.message)
        except asyncio.CancelledError:
            self._fail_reply(envelope)
            raise
        except Exception as exc:
            self.mailbox.record_processed()
            if reply is None:
                self._on_crash(exc)
            elif not reply.done():
                reply.set_exception(exc)
            return
        self.mailbox.record_processed()
        if reply is not None and not reply.done():
            reply.set_result(result)

    def _on_crash(self, exc: BaseException) -> None:
        if self._crash is not None:
            self.log.warning(events.ACTOR_FAILED, action="ignored", reason="already crashing", error=repr(exc))
            return
        self._crash = exc
        self._cancel_serving(keep=asyncio.current_task())

    def _cancel_serving(self, keep: asyncio.Task[Any] | None = None) -> None:
        for task in (self._loop_task, *self._handler_tasks):
            if task is not None and task is not keep and not task.done():
                task.cancel()

    # ------------------------------------------------------------------ helpers

    def _attach(self, actor: Actor) -> None:
        if actor.attached:
            raise ActorConfigError(f"{actor!r} is already started; an actor instance runs only once")
        self._actor = actor
        actor._attach(self.name, self.log, self.ref)

    def _interrupted_error(self, envelope: Envelope) -> BaseException:
        if self._crash is not None:
            return ActorCrashed(self.name, self._crash)
        return self.mailbox.stopped_error(f"{envelope.type_name} was interrupted")

    def _fail_reply(self, envelope: Envelope) -> None:
        if envelope.reply is not None and not envelope.reply.done():
            envelope.reply.set_exception(self._interrupted_error(envelope))

    def _fail_queued(self) -> None:
        for envelope in self.mailbox.take_all():
            if envelope.reply is None:
                self._dropped += 1
            elif not envelope.reply.done():
                envelope.reply.set_exception(self.mailbox.stopped_error(f"{envelope.type_name} was not handled"))

    def _log_failure(self, crash: BaseException, action: str) -> None:
        self.log.error(
            events.ACTOR_FAILED, action=action, supervision=self.supervision.value, restarts=self.restarts,
            error=f"{type(crash).__name__}: {crash}", exc_info=crash,
        )


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody may await ``started`` (a cancelled caller): no "never retrieved" warning
