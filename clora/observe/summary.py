"""One row per tenant from a run's events: progress, reward, accuracy and where the time went."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from clora import events as names
from clora.observe.spans import (
    EVALUATING,
    PUBLISHING,
    ROLLOUT,
    TRAINING,
    WAITING,
    Event,
    scripted_tenants,
    tenant_names,
    tenant_spans,
)

__all__ = ["TenantSummary", "summarize", "summary_table"]


class TenantSummary(msgspec.Struct, kw_only=True):
    """Totals of one tenant. Times are seconds, summed over the spans of ``clora.observe.spans``
    (the same split the timeline draws; a skipped step's rollout included)."""

    tenant: str
    status: str = "running"  # running | finished | failed | stopped (the runtime stopped while it ran)
    scripted: bool = False  # driven by a script (Runtime.tenant): steps are its optimizer steps
    steps: int = 0  # steps done: tenant.step + tenant.step_skipped, each step once (scripted: trainer.step)
    trained: int = 0  # steps that ran a train step (tenant.step)
    skipped: int = 0  # steps without learning signal
    reward_start: float | None = None  # reward/mean of the first step
    reward_end: float | None = None  # reward/mean of the last step
    accuracy_start: float | None = None  # first tenant.eval
    accuracy_end: float | None = None  # last tenant.eval
    time_rollout_s: float = 0.0
    time_waiting_s: float = 0.0  # asked the trainer, the device was busy with someone else
    time_train_s: float = 0.0  # the device worked on this tenant (trainer.step duration_s)
    time_sync_s: float = 0.0
    time_eval_s: float = 0.0
    versions_published: int = 0  # sync.published events (version 0 included)
    last_version: int | None = None
    failures: int = 0  # tenant.failed + trainer.step_rejected + sync.publish_failed
    last_error: str | None = None
    duration_s: float | None = None  # tenant.finished duration_s, else first to last event
    staleness: dict[int, int] = {}  # u - v -> data trained (trainer.step tags: v sampled, u trained on; docs/async.md)
    stale_dropped: int = 0  # data the trainer dropped past max_staleness

    @property
    def staleness_text(self) -> str:
        """``"0:40 1:12 2:3"`` (u - v: data trained), plus the dropped ones; "-" without tags."""
        text = " ".join(f"{age}:{n}" for age, n in sorted(self.staleness.items())) or "-"
        return text + (f" dropped:{self.stale_dropped}" if self.stale_dropped else "")


_FAILURE_EVENTS = (names.TENANT_FAILED, names.TRAINER_STEP_REJECTED, names.PUBLISH_FAILED)
_STOPPED_ERRORS = ("CancelledError", "KeyboardInterrupt", "SystemExit")
_TIME_FIELDS = {
    ROLLOUT: "time_rollout_s",
    WAITING: "time_waiting_s",
    TRAINING: "time_train_s",
    PUBLISHING: "time_sync_s",
    EVALUATING: "time_eval_s",
}


def _num(event: Event, key: str) -> float:
    value = event.get(key)
    return float(value) if value is not None else 0.0


def summarize(events: Sequence[Event]) -> list[TenantSummary]:
    """Per-tenant rows, in order of each tenant's first appearance."""
    events = sorted(events, key=lambda e: e.get("ts", 0.0))
    scripted = scripted_tenants(events)
    rows = {name: TenantSummary(tenant=name, scripted=name in scripted) for name in tenant_names(events)}
    first_ts: dict[str, float] = {}
    last_ts: dict[str, float] = {}
    done: dict[str, dict[int, Event]] = {}  # tenant -> step -> its tenant.step / tenant.step_skipped
    for e in events:
        tenant = e.get("tenant")
        if e.get("event") == names.RUNTIME_STOPPED:
            for row in rows.values():
                if row.status == "running" and row.tenant in first_ts:
                    row.status = "stopped"
        row = rows.get(str(tenant)) if tenant is not None else None
        if row is None:
            continue
        first_ts.setdefault(row.tenant, e["ts"])
        last_ts[row.tenant] = e["ts"]
        kind = e.get("event")
        if kind in (names.TENANT_STARTED, names.TENANT_OPENED):
            row.status = "running"
        elif kind == names.TRAINER_STEP and row.scripted:
            row.steps += 1
            row.trained += 1
        if kind == names.TRAINER_STEP:
            for age, n in (e.get("staleness") or {}).items():
                row.staleness[int(age)] = row.staleness.get(int(age), 0) + int(n)
            row.stale_dropped += int(e.get("stale_dropped") or 0)
        if kind in (names.TENANT_STEP, names.TENANT_STEP_SKIPPED):
            # A step done again after a resume (it ran, but its checkpoint was not written) counts once: its last try.
            done.setdefault(row.tenant, {})[int(e.get("step", -1))] = e
        elif kind == names.TENANT_EVAL:
            if row.accuracy_start is None:
                row.accuracy_start = float(e["accuracy"])
            row.accuracy_end = float(e["accuracy"])
        elif kind == names.ADAPTER_PUBLISHED:
            row.versions_published += 1
            row.last_version = int(e["adapter_version"])
        elif kind in (names.TENANT_FINISHED, names.TENANT_CLOSED):
            row.status = "finished"
            row.duration_s = _num(e, "duration_s")
        elif kind == names.TENANT_FAILED and str(e.get("error", "")).startswith(_STOPPED_ERRORS):
            row.status = "stopped"  # cancelled (Ctrl-C, the runtime stopping): no failure of its own
        elif kind in _FAILURE_EVENTS:
            row.failures += 1
            row.last_error = str(e.get("error", kind))
            if kind == names.TENANT_FAILED:
                row.status = "failed"
    for tenant, steps in done.items():
        row = rows[tenant]
        row.steps = len(steps)
        row.trained = sum(1 for e in steps.values() if e["event"] == names.TENANT_STEP)
        row.skipped = row.steps - row.trained
        rewards = [float(steps[k]["reward/mean"]) for k in sorted(steps) if steps[k].get("reward/mean") is not None]
        if rewards:
            row.reward_start, row.reward_end = rewards[0], rewards[-1]
    for span in tenant_spans(events):
        row = rows.get(span.row)
        if row is not None and span.kind in _TIME_FIELDS:
            setattr(row, _TIME_FIELDS[span.kind], getattr(row, _TIME_FIELDS[span.kind]) + span.duration)
    for row in rows.values():
        if row.duration_s is None and row.tenant in first_ts:
            row.duration_s = last_ts[row.tenant] - first_ts[row.tenant]
    return list(rows.values())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(rows: Sequence[TenantSummary], title: str | None = None) -> Any:
    """The rows as rich renderables: a progress table, a time table (seconds), the staleness of what each
    tenant trained on (when any tenant trained off-policy) and failure lines."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    progress = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("tenant", "status", "steps", "skip", "reward", "accuracy", "versions", "fail"):
        progress.add_column(column, justify="left" if column in ("tenant", "status") else "right", no_wrap=True)
    time = Table(title="time per tenant (s)", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("tenant", "total", "rollout", "waiting", "training", "sync", "eval"):
        time.add_column(column, justify="left" if column == "tenant" else "right", no_wrap=True)
    failures = []
    for r in rows:
        status = {"failed": "[red]failed[/]", "finished": "[green]finished[/]", "stopped": "[yellow]stopped[/]"}.get(
            r.status, r.status)
        if r.scripted:
            status += " (script)"
        progress.add_row(
            r.tenant, status, str(r.steps), str(r.skipped),
            f"{_fmt(r.reward_start, '.2f')}→{_fmt(r.reward_end, '.2f')}",
            f"{_fmt(r.accuracy_start, '.0%')}→{_fmt(r.accuracy_end, '.0%')}",
            f"{r.versions_published}" + (f" (v{r.last_version})" if r.last_version is not None else ""),
            str(r.failures),
        )
        time.add_row(
            r.tenant, _fmt(r.duration_s, ".1f"), f"{r.time_rollout_s:.1f}", f"{r.time_waiting_s:.1f}",
            f"{r.time_train_s:.1f}", f"{r.time_sync_s:.1f}", f"{r.time_eval_s:.1f}",
        )
        if r.last_error:
            failures.append(Text(f"{r.tenant}{' failed' if r.status == 'failed' else ''}: {r.last_error}", style="red"))
    off_policy = [r for r in rows if r.stale_dropped or any(age > 0 for age in r.staleness)]
    if not off_policy:
        return Group(progress, time, *failures)
    stale = Table(title="staleness of the trained data (u - v: data)", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("tenant", "trained on", "max"):
        stale.add_column(column, justify="left" if column != "max" else "right", no_wrap=True)
    for r in rows:
        stale.add_row(r.tenant, r.staleness_text, str(max(r.staleness, default=0)))
    return Group(progress, time, stale, *failures)
