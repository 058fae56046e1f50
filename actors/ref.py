"""ActorRef: the handle callers use to talk to an actor (tell, ask, stats, state)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from actors.errors import ActorError
from actors.lifecycle import ActorState
from actors.mailbox import Envelope, MailboxStats

if TYPE_CHECKING:
    from actors.actor import Actor
    from actors.cell import ActorCell

__all__ = ["ActorRef"]

A = TypeVar("A", bound="Actor")


class ActorRef(Generic[A]):
    """Send messages to one actor. Stays valid across restarts; after a stop, sends fail with ActorStopped."""

    __slots__ = ("_cell",)

    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        return self._cell.name

    @property
    def state(self) -> ActorState:
        return self._cell.state

    @property
    def alive(self) -> bool:
        return self._cell.state.alive

    @property
    def failure(self) -> BaseException | None:
        """The crash (or on_start error) that killed the actor, if it is DEAD."""
        return self._cell.failure

    @property
    def restarts(self) -> int:
        return self._cell.restarts

    @property
    def stats(self) -> MailboxStats:
        return self._cell.mailbox.stats()

    def accepts(self, message_type: type) -> bool:
        """Whether the actor has a handler for ``message_type`` (its declared inbox, when it has one)."""
        return self._cell.accepts(message_type)

    async def tell(self, message: Any) -> None:
        """Enqueue ``message`` and return; waits while the mailbox is full (backpressure).

        Raises UnknownMessage (before enqueuing) if no handler takes its type, ActorStopped if
        the actor is stopped. An exception in the handler crashes the actor (its supervision acts).
        """
        cell = self._cell
        spec = cell.handler_for(message)
        mailbox = cell.mailbox
        if len(mailbox) >= mailbox.capacity and cell.is_serving_task(asyncio.current_task()):
            raise ActorError(
                f"actor {cell.name!r} told itself {type(message).__qualname__} from a sequential handler "
                "while its mailbox is full: that would wait forever"
            )
        await mailbox.put(Envelope(message, spec, None))

    async def ask(self, message: Any) -> Any:
        """Enqueue ``message`` and wait for the handler's return value.

        The handler's exception is raised here (the actor keeps running). Cancelling the ask
        drops the message if still queued, cancels its task if the handler is concurrent, and
        lets a running sequential handler finish (its reply is dropped). Nothing else is removed.
        """
        cell = self._cell
        spec = cell.handler_for(message)
        if not spec.concurrent and cell.is_serving_task(asyncio.current_task()):
            raise ActorError(
                f"actor {cell.name!r} asked itself for {type(message).__qualname__} from a sequential "
                "handler: that would wait forever (use tell, or a concurrent handler)"
            )
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        envelope = Envelope(message, spec, reply)
        await cell.mailbox.put(envelope)
        try:
            return await reply
        except asyncio.CancelledError:
            cell.withdraw(envelope)
            raise

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.name} {self._cell.state.value}>"
