"""A bounded FIFO mailbox of envelopes with one consumer, fair blocked senders and statistics.

Capacity is explicit and at least 1 (asyncio treats maxsize=0 as unbounded; we never do).
Senders that find it full wait in FIFO order: a freed slot is handed to the oldest waiting
sender, so a newcomer cannot overtake it. An envelope can be taken out again while still
queued (a cancelled ask). After ``close`` nothing more gets in: waiting and new senders get
``ActorStopped``, while what is queued stays for the owner to drain or fail.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.errors import ActorConfigError, ActorStopped
from actors.handlers import HandlerSpec

__all__ = ["Envelope", "Mailbox", "MailboxStats", "check_capacity"]


class MailboxStats(msgspec.Struct, frozen=True, kw_only=True):
    depth: int  # messages queued now
    peak: int  # most messages ever queued at once
    waiting_senders: int  # senders blocked on a full mailbox now
    processed: int  # handlers that finished (returned or raised)
    capacity: int


@dataclass(eq=False, slots=True)
class Envelope:
    """A message on its way through a mailbox; ``reply`` is None for ``tell``."""

    message: Any
    handler: HandlerSpec
    reply: asyncio.Future[Any] | None
    task: asyncio.Task[Any] | None = field(default=None)  # a concurrent handler's task, once it runs

    @property
    def type_name(self) -> str:
        return type(self.message).__qualname__


def check_capacity(capacity: Any, owner: str) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ActorConfigError(
            f"{owner}: mailbox_size must be an int >= 1, got {capacity!r} (0 would make an unbounded queue)"
        )
    return capacity


class Mailbox:
    def __init__(self, owner: str, capacity: int) -> None:
        self.owner = owner
        self.capacity = check_capacity(capacity, f"actor {owner!r}")
        self._items: collections.deque[Envelope] = collections.deque()
        self._senders: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._granted = 0  # slots handed to woken senders that have not put their envelope yet
        self._getter: asyncio.Future[None] | None = None
        self._closed_reason: str | None = None
        self._closed_cause: BaseException | None = None
        self._peak = 0
        self._processed = 0

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> MailboxStats:
        return MailboxStats(
            depth=len(self._items),
            peak=self._peak,
            waiting_senders=len(self._senders),
            processed=self._processed,
            capacity=self.capacity,
        )

    def record_processed(self) -> None:
        self._processed += 1

    def stopped_error(self, detail: str) -> ActorStopped:
        """ActorStopped naming the owner, why it is closed, and ``detail`` ("Foo was not handled")."""
        error = ActorStopped(self.owner, f"{self._closed_reason or 'is stopped'}; {detail}")
        error.__cause__ = self._closed_cause
        return error

    # ------------------------------------------------------------------ senders

    def _has_room(self) -> bool:
        return len(self._items) + self._granted < self.capacity

    async def put(self, envelope: Envelope) -> None:
        """Enqueue, waiting (FIFO among senders) while the mailbox is full."""
        if self.closed:
            raise self.stopped_error(f"{envelope.type_name} was not accepted")
        if self._senders or not self._has_room():
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._senders.append(waiter)
            try:
                granted = await waiter  # True: a slot is ours; False: the mailbox closed
            except BaseException:
                if waiter.cancelled() or not waiter.done():
                    try:
                        self._senders.remove(waiter)
                    except ValueError:
                        pass
                elif waiter.result():  # a slot was granted, then we were cancelled: pass it on
                    self._granted -= 1
                    self._grant_slots()
                raise
            if granted:
                self._granted -= 1
            if self.closed:
                raise self.stopped_error(f"{envelope.type_name} was not accepted")
        self._items.append(envelope)
        self._peak = max(self._peak, len(self._items))
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)

    def _grant_slots(self) -> None:
        while self._senders and self._has_room():
            waiter = self._senders.popleft()
            if not waiter.done():
                self._granted += 1
                waiter.set_result(True)

    # ------------------------------------------------------------------ the owner

    async def get(self) -> Envelope | None:
        """The next envelope; None once the mailbox is closed and empty (only one consumer)."""
        while not self._items:
            if self.closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        envelope = self._items.popleft()
        self._grant_slots()
        return envelope

    def remove(self, envelope: Envelope) -> bool:
        """Take a still-queued envelope out; False if it already left the queue."""
        try:
            self._items.remove(envelope)
        except ValueError:
            return False
        self._grant_slots()
        return True

    def take_all(self) -> list[Envelope]:
        items = list(self._items)
        self._items.clear()
        self._grant_slots()
        return items

    def close(self, reason: str, cause: BaseException | None = None) -> None:
        """Accept nothing more: waiting and future senders get ActorStopped(reason)."""
        if self.closed:
            return
        self._closed_reason = reason
        self._closed_cause = cause
        while self._senders:
            waiter = self._senders.popleft()
            if not waiter.done():
                waiter.set_result(False)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
