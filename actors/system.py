"""ActorSystem: starts actors in one TaskGroup, stops them, and supervises their crashes."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Callable, TypeVar

import structlog

from actors import events
from actors.actor import Actor
from actors.cell import ActorCell
from actors.errors import ActorConfigError, SystemNotRunning
from actors.lifecycle import STOP_MODES, StopMode, Supervision
from actors.ref import ActorRef

__all__ = ["ActorSystem"]

A = TypeVar("A", bound=Actor)


class ActorSystem:
    """Owns one TaskGroup holding every actor's task.

    ``async with ActorSystem("name") as system``: a clean exit drains and stops all actors in
    reverse start order; an exit by exception (or cancellation) aborts them. An actor that
    crashes under ESCALATE (or RESTART past its limit) stops everything and ``ActorCrashed``
    leaves the ``async with``. ``logger`` (structlog) is the base of every actor's ``self.log``.
    """

    def __init__(self, name: str = "actors", *, logger: Any = None) -> None:
        self.name = name
        self.log = (logger if logger is not None else structlog.get_logger("actors")).bind(system=name)
        self._group: asyncio.TaskGroup | None = None
        self._cells: list[ActorCell] = []  # in start order; finished ones are pruned on start
        self._running = False

    # ------------------------------------------------------------------ context

    async def __aenter__(self) -> ActorSystem:
        if self._group is not None:
            raise SystemNotRunning(f"actor system {self.name!r} was already entered; make a new one")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._running = True
        self.log.info(events.SYSTEM_STARTED)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._group is not None
        mode: StopMode = "drain" if exc is None else "abort"
        pending = exc
        try:
            await self.shutdown(mode)
        except BaseException as error:  # cancelled by an escalating actor, or an on_stop failed
            if pending is None:
                pending = error
        try:
            await self._group.__aexit__(
                type(pending) if pending is not None else None,
                pending,
                pending.__traceback__ if pending is not None else None,
            )
        except BaseExceptionGroup as group:
            crashes = [e for e in group.exceptions if e is not pending]
            if not crashes:  # only the body's own error went through the group
                if pending is exc:
                    return False
                raise pending from None
            if len(group.exceptions) == 1:
                crash = crashes[0]
                raise crash from crash.__cause__
            raise
        finally:
            self.log.info(events.SYSTEM_STOPPED, mode=mode)
        if pending is not None and pending is not exc:
            raise pending
        return False

    # ------------------------------------------------------------------ actors

    async def start(
        self,
        actor: A | Callable[[], A],
        *,
        name: str,
        supervision: Supervision = Supervision.ESCALATE,
        max_restarts: int = 3,
        mailbox_size: int | None = None,
    ) -> ActorRef[A]:
        """Start an actor (an instance, or a factory that makes one) and return its ref after on_start.

        An exception in on_start raises here (the actor is then dead and its name free again).
        RESTART needs a factory (an Actor class works), called again for each restart.
        ``mailbox_size`` overrides the class attribute.
        """
        if not self._running or self._group is None:
            raise SystemNotRunning(f"actor system {self.name!r} is not running; cannot start {name!r}")
        if not isinstance(supervision, Supervision):
            raise ActorConfigError(f"supervision must be a Supervision, got {supervision!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ActorConfigError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        self._cells = [c for c in self._cells if not c.done.done()]
        if any(c.name == name for c in self._cells):
            raise ActorConfigError(f"actor system {self.name!r} already runs an actor named {name!r}")
        if isinstance(actor, Actor):
            if supervision is Supervision.RESTART:
                raise ActorConfigError(
                    f"RESTART needs a factory to make fresh instances of {name!r}: "
                    "pass the class or a callable, not an instance"
                )
            instance, factory = actor, None
        elif callable(actor):
            factory = actor
            instance = factory()
            if not isinstance(instance, Actor):
                raise ActorConfigError(f"the factory of {name!r} returned {instance!r}, not an Actor")
        else:
            raise ActorConfigError(f"start() takes an Actor or a factory of one, got {actor!r}")
        cell = ActorCell(
            name,
            instance,
            factory,
            supervision,
            max_restarts,
            mailbox_size if mailbox_size is not None else type(instance).mailbox_size,
            self.log.bind(actor=name),
        )
        self._cells.append(cell)
        cell.task = self._group.create_task(cell.run(), name=f"actor:{name}")
        cell.task.add_done_callback(cell.on_task_done)
        try:
            await asyncio.shield(cell.started)
        except asyncio.CancelledError:
            cell.request_stop("abort")
            raise
        return cell.ref  # type: ignore[return-value]

    async def stop(self, ref: ActorRef[Any], mode: StopMode = "drain") -> None:
        """Stop one actor and wait until it is stopped; no-op if it already is.

        drain: accept nothing new, handle what is queued, let running handlers finish, on_stop.
        abort: cancel running handlers, fail queued asks with ActorStopped, drop queued tells, on_stop.
        If the caller is cancelled while draining, the stop becomes an abort. An exception raised by
        on_stop is re-raised here. Called from the actor's own code, it only requests the stop
        (waiting for itself would never end) and returns.
        """
        if mode not in STOP_MODES:
            raise ActorConfigError(f"stop mode must be one of {STOP_MODES}, got {mode!r}")
        cell = ref._cell
        cell.request_stop(mode)
        if cell.is_own_task(asyncio.current_task()):
            return
        try:
            await asyncio.shield(cell.done)
        except asyncio.CancelledError:
            cell.request_stop("abort")
            raise
        if cell.stop_error is not None:
            error, cell.stop_error = cell.stop_error, None
            raise error

    async def shutdown(self, mode: StopMode = "drain") -> None:
        """Stop every actor in reverse start order; no actor can start afterwards."""
        self._running = False
        errors: list[Exception] = []
        for cell in reversed(self._cells):
            try:
                await self.stop(cell.ref, mode)
            except Exception as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"on_stop failed in actor system {self.name!r}", errors)

    @property
    def actors(self) -> dict[str, ActorRef[Any]]:
        """Refs of the actors that have not finished, by name, in start order."""
        return {c.name: c.ref for c in self._cells if not c.done.done()}

    def __repr__(self) -> str:
        return f"<ActorSystem {self.name} actors={len(self.actors)}>"
