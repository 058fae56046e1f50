"""Event names the actor kernel logs through structlog (every event carries ``actor`` and ``system``)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACTOR_FAILED",
    "ACTOR_HOOK_FAILED",
    "ACTOR_MAILBOX_STATS",
    "ACTOR_RESTARTED",
    "ACTOR_STARTED",
    "ACTOR_START_FAILED",
    "ACTOR_STOPPED",
    "SYSTEM_STARTED",
    "SYSTEM_STOPPED",
]

ACTOR_STARTED: Final = "actor.started"
"""An actor's on_start finished; it takes messages now (``mailbox_size``, ``supervision``)."""
ACTOR_START_FAILED: Final = "actor.start_failed"
"""An actor's on_start raised; the ``error`` went to the caller of ``system.start``."""
ACTOR_STOPPED: Final = "actor.stopped"
"""An actor stopped cleanly after on_stop (``mode``, ``processed``, ``dropped`` messages)."""
ACTOR_FAILED: Final = "actor.failed"
"""An actor crashed (``error``); ``action`` says what its ``supervision`` did: restart, isolate or escalate."""
ACTOR_RESTARTED: Final = "actor.restarted"
"""A fresh instance of a crashed actor finished on_start (``restarts`` so far, ``max_restarts``)."""
ACTOR_HOOK_FAILED: Final = "actor.hook_failed"
"""on_stop or on_failure raised (``hook`` names it, ``error``); the stop or the supervision went on."""
ACTOR_MAILBOX_STATS: Final = "actor.mailbox_stats"
"""An actor's mailbox when the actor ended (stopped, crashed or cancelled): ``depth``, ``peak`` (most
messages ever queued at once), ``capacity``, ``processed``, ``waiting_senders`` (senders blocked on a full mailbox)."""
SYSTEM_STARTED: Final = "actor_system.started"
"""An actor system was entered and takes actors."""
SYSTEM_STOPPED: Final = "actor_system.stopped"
"""An actor system stopped all its actors (``mode``) and left its task group."""
