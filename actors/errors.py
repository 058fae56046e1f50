"""The actor kernel's errors: one root (``ActorError``), each also the stdlib type it replaces."""

from __future__ import annotations

__all__ = [
    "ActorError",
    "ActorDefinitionError",
    "ActorConfigError",
    "SystemNotRunning",
    "ActorStopped",
    "UnknownMessage",
    "ActorCrashed",
]


class ActorError(Exception):
    """Root of every error the actor kernel raises on purpose."""


class ActorDefinitionError(ActorError, TypeError):
    """An Actor subclass or one of its handlers is malformed (found when the class is created)."""


class ActorConfigError(ActorError, ValueError):
    """A value given to the kernel is invalid: mailbox size, actor name, stop mode, restart limit."""


class SystemNotRunning(ActorError, RuntimeError):
    """The actor system is not entered yet, or it is shutting down: no actor can start."""


class ActorStopped(ActorError, RuntimeError):
    """The actor is stopped (or dead): a message was not, and will not be, handled.

    ``actor`` names the actor; ``__cause__`` is the crash when the actor died of one.
    """

    def __init__(self, actor: str, reason: str) -> None:
        super().__init__(f"actor {actor!r} {reason}")
        self.actor = actor
        self.reason = reason

    def __reduce__(self):  # pickled across processes (clora.cluster): rebuilt from its fields
        return (type(self), (self.actor, self.reason))


class UnknownMessage(ActorError, TypeError):
    """The actor has no handler for this message type (raised before anything is enqueued)."""

    def __init__(self, actor: str, message_type: type, accepted: tuple[type, ...]) -> None:
        names = ", ".join(sorted(t.__qualname__ for t in accepted)) or "nothing"
        super().__init__(f"actor {actor!r} has no handler for {message_type.__qualname__}; it accepts: {names}")
        self.actor = actor
        self.message_type = message_type
        self.accepted = accepted

    def __reduce__(self):
        return (type(self), (self.actor, self.message_type, self.accepted))


class ActorCrashed(ActorError, RuntimeError):
    """An actor crashed: an exception escaped a handler of a told message, or a restart failed.

    Leaves ``async with ActorSystem`` when the actor's supervision is ESCALATE; an ask whose
    handler was interrupted by the crash fails with it too. ``cause`` (also ``__cause__``) is
    the original exception.
    """

    def __init__(self, actor: str, cause: BaseException) -> None:
        super().__init__(f"actor {actor!r} crashed: {type(cause).__name__}: {cause}")
        self.actor = actor
        self.cause = cause
        self.__cause__ = cause

    def __reduce__(self):
        return (type(self), (self.actor, self.cause))
