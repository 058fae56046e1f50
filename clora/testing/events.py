"""Event capture: the structured events actors and runtimes log, as a list with filters.

``capture_events()`` collects what is logged through structlog while it is active (actors started
in an ``ActorSystem`` log that way); ``Events.from_run(run_dir)`` reads a Runtime's run folder.
Event names are the constants in ``clora.events``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clora.events import read_events

__all__ = ["Events", "RecordingLog", "capture_events", "events_by_start"]


class Events(list):
    """Event dicts in the order they were logged, each with its name under ``"event"``."""

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Events:
        """The events in ``<run_dir>/events.jsonl`` (every run written there, oldest first)."""
        return cls(read_events(run_dir))

    def named(self, *names: str, tenant: str | None = None, **fields: Any) -> Events:
        """The events called one of ``names`` (any name when none is given), of ``tenant`` when it is
        given, whose ``fields`` have the given values."""
        return Events(
            e for e in self
            if (not names or e.get("event") in names)
            and (tenant is None or e.get("tenant") == tenant)
            and all(key in e and e[key] == value for key, value in fields.items())
        )

    def field(self, key: str) -> list[Any]:
        """The value of ``key`` in every event, in order (KeyError when an event lacks it)."""
        return [e[key] for e in self]


class RecordingLog:
    """A stand-in for a structlog logger handed to an object directly (``log=``): appends every
    ``(event, fields)`` it is given to ``seen``, at info and warning level alike."""

    def __init__(self, seen: list[tuple[str, dict[str, Any]]]) -> None:
        self.seen = seen

    def info(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    warning = info


@contextlib.contextmanager
def capture_events() -> Iterator[Events]:
    """Collect every event logged through structlog in this block (its other output is suppressed)."""
    import structlog

    captured = Events()

    def collect(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("log_level", method_name)
        captured.append(event_dict)
        raise structlog.DropEvent

    # Swap the configured processors in place: loggers bound earlier hold this same list.
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    processors[:] = [collect]
    structlog.configure(processors=processors)
    try:
        yield captured
    finally:
        processors[:] = saved
        structlog.configure(processors=processors)


def events_by_start(run_dir: str | Path) -> list[list[dict[str, Any]]]:
    """The events of each runtime start in ``run_dir``'s events.jsonl, oldest first (a line cut by
    SIGKILL is dropped; no file: no runs). Tests of kills and resumes compare one start with the next."""
    import msgspec

    from actors.events import SYSTEM_STARTED

    runs: list[list[dict[str, Any]]] = []
    path = Path(run_dir) / "events.jsonl"
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if (event["event"] == SYSTEM_STARTED and event.get("system") == "clora") or not runs:
            runs.append([])
        runs[-1].append(event)
    return runs
