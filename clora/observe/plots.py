"""Pictures of a run: a Gantt-style timeline (where time goes) and reward/accuracy curves.

Drawn on a bare matplotlib ``Figure`` (Agg canvas, no pyplot), so nothing global changes and
no display is needed. matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import msgspec

from clora import events as names
from clora.observe.spans import (
    EVALUATING,
    EXPORTING,
    KINDS,
    PUBLISHING,
    ROLLOUT,
    SYNC_ROW,
    TRAINER_ROW,
    TRAINING,
    WAITING,
    Event,
    Span,
    all_spans,
    in_flight_sequences,
    tenant_names,
)

__all__ = ["PlotInfo", "KIND_COLORS", "timeline", "curves", "work_labels"]

KIND_COLORS = {
    ROLLOUT: "#4C72B0",
    WAITING: "#DDDDDD",
    TRAINING: "#C44E52",
    PUBLISHING: "#55A868",
    EVALUATING: "#8172B2",
    EXPORTING: "#CCB974",
}


class PlotInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a picture shows: its file, its rows (or series) and how many marks were drawn."""

    path: Path
    rows: list[str]
    marks: int  # spans (timeline) or plotted points (curves)


def _union_length(spans: Sequence[Span]) -> float:
    total, current_end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        start = max(s.start, current_end)
        if s.end > start:
            total += s.end - start
            current_end = s.end
    return total


def work_labels(spans: Sequence[Span], wall: float) -> list[tuple[str, float, float, str]]:
    """(row, start, end, tenants) for the trainer's and sync actor's work, where the text fits.

    A fused trainer step is one span with several tenants; back-to-back spans of the same tenants (a
    script's forward_backward then optim_step) are one labelled block."""
    whose: dict[tuple[str, float, float], list[str]] = defaultdict(list)
    for s in spans:
        if s.row in (TRAINER_ROW, SYNC_ROW) and s.tenant:
            whose[(s.row, round(s.start, 3), round(s.end, 3))].append(s.tenant)
    blocks: list[list] = []
    for (row, start, end), owners in sorted(whose.items(), key=lambda item: (item[0][0], item[0][1])):
        label = "+".join(owners)
        last = blocks[-1] if blocks else None
        if last is not None and last[0] == row and last[3] == label and start - last[2] <= 0.005 * wall:
            last[2] = max(last[2], end)
        else:
            blocks.append([row, start, end, label])
    # about 0.6% of the axis per character at fontsize 7 on a 12-inch figure
    return [(row, start, end, label) for row, start, end, label in blocks
            if (end - start) / wall > 0.006 * len(label) + 0.01]


def timeline(events: Sequence[Event], out_png: str | Path, *, title: str | None = None) -> PlotInfo:
    """One row per tenant (rollout, waiting for the trainer, training, publishing, evaluating), one
    for the trainer (busy per tenant) and one for the sync actor; below, sequences decoding in the
    sampler. The x axis is seconds since the first span."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    spans = all_spans(events)
    if not spans:
        raise ValueError("no spans to draw: the events hold no tenant steps, evaluations, trainer steps or publishes")
    t0 = min(s.start for s in spans)
    t1 = max(s.end for s in spans)
    wall = max(t1 - t0, 1e-9)
    tenants = tenant_names(events)
    rows = tenants + [TRAINER_ROW, SYNC_ROW]
    times, counts = in_flight_sequences(events)

    height = 1.2 + 0.45 * len(rows) + (1.6 if times else 0.0)
    fig = Figure(figsize=(12, height), dpi=110, layout="constrained")
    if times:
        gantt, sampler = fig.subplots(2, 1, sharex=True, height_ratios=[max(len(rows), 2), 2])
    else:
        gantt, sampler = fig.subplots(1, 1), None

    y_of = {row: len(rows) - 1 - i for i, row in enumerate(rows)}
    by_row_kind: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for s in spans:
        if s.row in y_of:
            by_row_kind[(s.row, s.kind)].append((s.start - t0, s.duration))
    for (row, kind), bars in by_row_kind.items():
        y = y_of[row]
        gantt.broken_barh(bars, (y - 0.38, 0.76), facecolors=KIND_COLORS[kind], edgecolor="white", linewidth=1.0)
    for row, start, end, label in work_labels(spans, wall):  # say whose work it was, where there is room
        gantt.text((start + end) / 2 - t0, y_of[row], label, ha="center", va="center", fontsize=7,
                   color="white", clip_on=True)

    trainer_busy = _union_length([s for s in spans if s.row == TRAINER_ROW])
    labels = []
    for row in rows:
        if row == TRAINER_ROW:
            labels.append(f"trainer (busy {trainer_busy / wall:.0%})")
        elif row == SYNC_ROW:
            labels.append("sync")
        else:
            waited = sum(s.duration for s in spans if s.row == row and s.kind == WAITING)
            labels.append(f"{row} (waited {waited:.0f} s)" if waited else row)
    gantt.set_yticks([y_of[r] for r in rows], labels)
    gantt.set_ylim(-0.7, len(rows) - 0.3)
    gantt.set_xlim(0, wall)
    gantt.grid(axis="x", alpha=0.3)
    used = [k for k in KINDS if any(kind == k for (_, kind) in by_row_kind)]
    gantt.set_title(title or f"where time goes: {len(tenants)} tenants, {wall:.0f} s")
    fig.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in used], loc="outside lower center",
               ncol=len(used), fontsize=8, frameon=False)
    if sampler is not None:
        sampler.step([t - t0 for t in times], counts, where="post", color=KIND_COLORS[ROLLOUT])
        sampler.fill_between([t - t0 for t in times], counts, step="post", alpha=0.3, color=KIND_COLORS[ROLLOUT])
        sampler.set_ylabel("sequences\ndecoding", fontsize=8)
        sampler.yaxis.set_major_locator(MaxNLocator(integer=True))
        sampler.grid(alpha=0.3)
        sampler.set_xlabel("seconds since start")
    else:
        gantt.set_xlabel("seconds since start")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return PlotInfo(path=out, rows=rows, marks=sum(len(b) for b in by_row_kind.values()))


def curves(events: Sequence[Event], out_png: str | Path, *, title: str | None = None) -> PlotInfo:
    """reward/mean per step (left) and held-out accuracy per step (right), one line per tenant."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    reward: dict[str, list[tuple[int, float]]] = defaultdict(list)
    accuracy: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e.get("ts", 0.0)):
        kind, tenant = e.get("event"), e.get("tenant")
        if tenant is None:
            continue
        if kind in (names.TENANT_STEP, names.TENANT_STEP_SKIPPED) and e.get("reward/mean") is not None:
            reward[str(tenant)].append((int(e["step"]), float(e["reward/mean"])))
        elif kind == names.TENANT_EVAL:
            accuracy[str(tenant)].append((int(e["step"]), float(e["accuracy"])))
    tenants = [t for t in tenant_names(events) if t in reward or t in accuracy]
    if not tenants:
        raise ValueError("no curves to draw: the events hold no tenant.step or tenant.eval lines")
    fig = Figure(figsize=(12, 4.5), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2)
    marks = 0
    for tenant in tenants:
        for ax, series in ((left, reward), (right, accuracy)):
            points = sorted(series.get(tenant, []))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=tenant)
                marks += len(points)
    left.set(title="reward/mean (training samples)", xlabel="step", ylabel="mean reward")
    right.set(title="held-out accuracy (greedy)", xlabel="step", ylabel="accuracy", ylim=(-0.03, 1.03))
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not accuracy:
        right.text(0.5, 0.5, "no tenant.eval events", ha="center", va="center", transform=right.transAxes)
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return PlotInfo(path=out, rows=tenants, marks=marks)
