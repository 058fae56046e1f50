"""Supervision policies and the states an actor goes through."""

from __future__ import annotations

import enum

__all__ = ["Supervision", "ActorState", "StopMode", "STOP_MODES"]


class Supervision(enum.Enum):
    """What happens when an actor crashes (an exception escapes a handler of a told message)."""

    ESCALATE = "escalate"
    """The crash propagates: the system stops every actor and ``ActorCrashed`` leaves ``async with``."""
    ISOLATE = "isolate"
    """The actor is marked dead (a failure event is logged); siblings keep running; asks fail with ActorStopped."""
    RESTART = "restart"
    """A fresh instance from the factory takes over the same mailbox, up to ``max_restarts``; then escalate."""


class ActorState(enum.Enum):
    STARTING = "starting"  # on_start runs
    RUNNING = "running"  # takes messages
    RESTARTING = "restarting"  # crashed under RESTART; a fresh instance is on its way
    STOPPING = "stopping"  # a stop was requested; draining or aborting, then on_stop
    STOPPED = "stopped"  # stopped cleanly (or before it finished starting)
    DEAD = "dead"  # crashed (or on_start failed); ``ref.failure`` holds the exception

    @property
    def alive(self) -> bool:
        return self in (ActorState.STARTING, ActorState.RUNNING, ActorState.RESTARTING)


StopMode = str  # "drain" | "abort"
STOP_MODES = ("drain", "abort")
