"""A small typed actor kernel on asyncio: bounded mailboxes, tell/ask, supervision, one TaskGroup.

No ML imports: stdlib, msgspec, structlog (and uvloop when installed). See docs/actors.md.
"""

from __future__ import annotations

from actors import events
from actors.actor import Actor
from actors.errors import (
    ActorConfigError,
    ActorCrashed,
    ActorDefinitionError,
    ActorError,
    ActorStopped,
    SystemNotRunning,
    UnknownMessage,
)
from actors.handlers import HandlerSpec, handler
from actors.lifecycle import ActorState, Supervision
from actors.mailbox import MailboxStats
from actors.ref import ActorRef
from actors.runner import run, uvloop_available
from actors.system import ActorSystem

__all__ = [
    "Actor",
    "ActorRef",
    "ActorSystem",
    "ActorState",
    "Supervision",
    "MailboxStats",
    "HandlerSpec",
    "handler",
    "run",
    "uvloop_available",
    "events",
    "ActorError",
    "ActorStopped",
    "ActorCrashed",
    "UnknownMessage",
    "ActorDefinitionError",
    "ActorConfigError",
    "SystemNotRunning",
]
