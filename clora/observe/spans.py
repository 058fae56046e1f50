"""What each tenant and actor was doing when: spans of time derived from a run's events.

Events carry ``ts`` at the END of what they describe and a ``duration_s``, so a span is
``[ts - duration_s, ts]``. One ``tenant.step`` splits into rollout, waiting for the trainer,
training and publishing: the tenant's ``time/train`` is the whole ask to the trainer (queue
included); the matching ``trainer.step`` (same tenant, version = the step's adapter_version)
says how much of it the device actually worked on this tenant. The rest is waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from clora.errors import ConfigError
from clora import events as names

__all__ = [
    "ROLLOUT",
    "WAITING",
    "TRAINING",
    "PUBLISHING",
    "EVALUATING",
    "EXPORTING",
    "KINDS",
    "TRAINER_ROW",
    "SYNC_ROW",
    "Span",
    "Event",
    "last_run",
    "load_run_events",
    "tenant_names",
    "scripted_tenants",
    "scripted_spans",
    "trainer_steps_by_version",
    "split_step",
    "tenant_spans",
    "actor_spans",
    "all_spans",
    "in_flight_sequences",
]

Event = dict[str, Any]

ROLLOUT: Final = "rollout"
WAITING: Final = "waiting for trainer"
TRAINING: Final = "training"
PUBLISHING: Final = "publishing"
EVALUATING: Final = "evaluating"
EXPORTING: Final = "exporting"
KINDS: Final = (ROLLOUT, WAITING, TRAINING, PUBLISHING, EVALUATING, EXPORTING)

TRAINER_ROW: Final = "trainer"
SYNC_ROW: Final = "sync"

TRAINER_WORK: Final = (names.TRAINER_STEP, names.TRAINER_FORWARD_BACKWARD, names.TRAINER_EXPORTED)
"""Trainer events whose ``duration_s`` is time the device was busy for one tenant."""


class Span(msgspec.Struct, frozen=True, kw_only=True):
    row: str  # a tenant name, TRAINER_ROW or SYNC_ROW
    kind: str  # one of KINDS
    start: float  # epoch seconds
    end: float
    tenant: str | None = None  # whose work it was (for the trainer and sync rows)

    @property
    def duration(self) -> float:
        return self.end - self.start


def _f(event: Event, key: str, default: float = 0.0) -> float:
    value = event.get(key, default)
    return float(value) if value is not None else default


def last_run(events: Iterable[Event]) -> list[Event]:
    """The events of the newest run in the list (a run folder's file is appended to).

    A run starts at its ``runtime.started`` event minus that event's ``duration_s`` (the start-up
    time); with no such event every event counts. A runtime started with ``resume`` continues the
    run before it (``clora run --resume`` after a crash or Ctrl-C): to its user that is one run, so
    the run reaches back to the last start without ``resume``.
    """
    events = list(events)
    starts = sorted((e for e in events if e.get("event") == names.RUNTIME_STARTED), key=lambda e: e["ts"])
    if not starts:
        return events
    first = len(starts) - 1
    while first > 0 and starts[first].get("resume"):
        first -= 1
    begin = starts[first]["ts"] - _f(starts[first], "duration_s")
    return [e for e in events if e.get("ts", 0.0) >= begin]


_TENANT_ACTIVITY = (names.TRAINER_STEP, names.TRAINER_FORWARD_BACKWARD, names.ADAPTER_PUBLISHED, names.SAMPLE_DONE)


def load_run_events(path: str | Path, *, all_runs: bool = False) -> list[Event]:
    """The events of a run folder (or an events.jsonl file): its newest run unless ``all_runs``.
    A missing or empty file is a ConfigError naming it."""
    from clora.events import read_events

    file = Path(path) / "events.jsonl" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"no events file at {str(file)!r} (a run folder holds events.jsonl)")
    events = list(read_events(file))
    if not events:
        raise ConfigError(f"{str(file)!r} holds no events")
    return events if all_runs else last_run(events)


def tenant_names(events: Iterable[Event]) -> list[str]:
    """Tenants in order of first appearance (tenant.* events, and samples, trainer steps and publishes,
    which scripted tenants have too)."""
    seen: dict[str, None] = {}
    for e in events:
        kind = str(e.get("event", ""))
        if e.get("tenant") is not None and (kind.startswith("tenant.") or kind in _TENANT_ACTIVITY):
            seen.setdefault(str(e["tenant"]), None)
    return list(seen)


def trainer_steps_by_version(events: Iterable[Event]) -> dict[tuple[str, int], Event]:
    """``trainer.step`` events keyed by (tenant, version after the step)."""
    return {
        (str(e["tenant"]), int(e["version"])): e
        for e in events
        if e.get("event") == names.TRAINER_STEP and "tenant" in e and "version" in e
    }


def split_step(step: Event, trainer_step: Event | None) -> list[Span]:
    """One ``tenant.step`` as consecutive spans: rollout, waiting, training, (waiting), publishing."""
    tenant = str(step["tenant"])
    end = float(step["ts"])
    start = end - _f(step, "duration_s")
    rollout_end = min(end, start + _f(step, "time/rollout"))
    train_end = min(end, rollout_end + _f(step, "time/train"))
    spans = [Span(row=tenant, kind=ROLLOUT, start=start, end=rollout_end)]
    if trainer_step is not None:
        work_end = min(max(float(trainer_step["ts"]), rollout_end), train_end)
        work_start = max(rollout_end, work_end - _f(trainer_step, "duration_s"))
        spans += [
            Span(row=tenant, kind=WAITING, start=rollout_end, end=work_start),
            Span(row=tenant, kind=TRAINING, start=work_start, end=work_end),
            Span(row=tenant, kind=WAITING, start=work_end, end=train_end),
        ]
    else:  # no trainer event to tell queueing from work: the whole ask counts as training
        spans.append(Span(row=tenant, kind=TRAINING, start=rollout_end, end=train_end))
    spans.append(Span(row=tenant, kind=PUBLISHING, start=train_end, end=end))
    return [s for s in spans if s.end > s.start]


def scripted_tenants(events: Iterable[Event]) -> set[str]:
    """Tenants driven by a script (``Runtime.tenant``): they act (sample, train, publish) but run no
    experiment, so they have no ``tenant.started``."""
    events = list(events)
    experiments = {str(e["tenant"]) for e in events if e.get("event") == names.TENANT_STARTED and "tenant" in e}
    return set(tenant_names(events)) - experiments


_SCRIPTED_WORK = {
    names.SAMPLE_DONE: ROLLOUT,
    names.TRAINER_STEP: TRAINING,
    names.TRAINER_FORWARD_BACKWARD: TRAINING,
    names.ADAPTER_PUBLISHED: PUBLISHING,
    names.TRAINER_EXPORTED: EXPORTING,
}


def _union(spans: list[Span]) -> list[Span]:
    """Overlapping spans of one row and kind merged (concurrent samples of one tenant are one busy span)."""
    merged: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start):
        if merged and s.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(row=last.row, kind=last.kind, start=last.start, end=max(last.end, s.end))
        else:
            merged.append(s)
    return merged


def scripted_spans(events: Sequence[Event]) -> list[Span]:
    """A scripted tenant's own row: sampling (as rollout), training, publishing and exporting, from the
    sampler's, trainer's and sync actor's events about it."""
    scripted = scripted_tenants(events)
    spans: dict[tuple[str, str], list[Span]] = {}
    for e in events:
        kind, tenant = _SCRIPTED_WORK.get(e.get("event")), e.get("tenant")
        if kind is None or tenant is None or str(tenant) not in scripted:
            continue
        end = float(e["ts"])
        spans.setdefault((str(tenant), kind), []).append(
            Span(row=str(tenant), kind=kind, start=end - _f(e, "duration_s"), end=end)
        )
    return [s for group in spans.values() for s in _union(group) if s.end > s.start]


def tenant_spans(events: Sequence[Event]) -> list[Span]:
    """Every tenant's rollout / waiting / training / publishing / evaluating spans (scripted tenants'
    from ``scripted_spans``).

    A skipped step (no learning signal) has no duration of its own: its rollout is taken to run
    from the tenant's previous activity to the skip event (a tenant's steps run back to back).
    """
    by_version = trainer_steps_by_version(events)
    previous_end: dict[str, float] = {}
    spans: list[Span] = scripted_spans(events)
    for e in sorted(events, key=lambda e: e.get("ts", 0.0)):
        kind, tenant = e.get("event"), e.get("tenant")
        if tenant is None:
            continue
        tenant = str(tenant)
        ts = float(e["ts"])
        if kind == names.TENANT_STARTED:
            previous_end[tenant] = ts
        elif kind == names.TENANT_EVAL:
            spans.append(Span(row=tenant, kind=EVALUATING, start=ts - _f(e, "duration_s"), end=ts))
            previous_end[tenant] = ts
        elif kind == names.TENANT_STEP:
            trainer_step = by_version.get((tenant, int(e.get("adapter_version", -1))))
            spans += split_step(e, trainer_step)
            previous_end[tenant] = ts
        elif kind == names.TENANT_STEP_SKIPPED:
            start = previous_end.get(tenant)
            if start is not None and ts > start:
                spans.append(Span(row=tenant, kind=ROLLOUT, start=start, end=ts))
            previous_end[tenant] = ts
    return spans


def actor_spans(events: Iterable[Event]) -> list[Span]:
    """The trainer's busy spans (per tenant) and the sync actor's publishes."""
    spans = []
    for e in events:
        kind = e.get("event")
        if kind in TRAINER_WORK or kind == names.ADAPTER_PUBLISHED:
            ts = float(e["ts"])
            span_kind = {names.ADAPTER_PUBLISHED: PUBLISHING, names.TRAINER_EXPORTED: EXPORTING}.get(kind, TRAINING)
            row = SYNC_ROW if kind == names.ADAPTER_PUBLISHED else TRAINER_ROW
            spans.append(Span(row=row, kind=span_kind, start=ts - _f(e, "duration_s"), end=ts, tenant=e.get("tenant")))
    return spans


def all_spans(events: Sequence[Event]) -> list[Span]:
    return tenant_spans(events) + actor_spans(events)


def in_flight_sequences(events: Iterable[Event]) -> tuple[list[float], list[int]]:
    """Sequences decoding in the sampler over time, from ``sampler.sample_done`` (n per request).

    Returns change points (epoch seconds, ascending) and the count from each point on.
    """
    changes: list[tuple[float, int]] = []
    for e in events:
        if e.get("event") == names.SAMPLE_DONE:
            n = int(e.get("n", 1))
            end = float(e["ts"])
            changes += [(end - _f(e, "duration_s"), n), (end, -n)]
    changes.sort()
    times, counts, current = [], [], 0
    for t, delta in changes:
        current += delta
        if times and times[-1] == t:
            counts[-1] = current
        else:
            times.append(t)
            counts.append(current)
    return times, counts
