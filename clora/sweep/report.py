"""A sweep's output: the ranked rich table, the tenants table of ``--check``, results.json and the
reward-curve picture (colour per point, line style per seed)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from clora.sweep.spec import Sweep

if TYPE_CHECKING:
    from clora.sweep.ranking import PointRow, TenantOutcome

__all__ = ["ranked_table", "tenants_table", "results_document", "write_results", "plot_rewards", "LINE_STYLES"]

LINE_STYLES = ("-", "--", ":", "-.")  # seed 1, 2, 3, 4, then again


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ranked_table(rows: Sequence[PointRow], title: str) -> Any:
    """Points best first: final held-out accuracy over seeds, its pooled interval, reward area, steps, time."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("#", "point", "final acc (mean ± sd over seeds)", "pooled 95% CI", "correct", "start acc",
                   "reward area", "steps", "time s", "failed"):
        table.add_column(column, justify="left" if column in ("point", "failed") else "right")
    for r in rows:
        spread = "-" if r.accuracy_mean is None else f"{r.accuracy_mean:.0%} ± {r.accuracy_std:.0%}"
        if r.failed and r.accuracy_mean is not None:  # the mean of fewer seeds than the others
            spread += f" ({len(r.tenants) - len(r.failed)} of {len(r.tenants)} seeds)"
        interval = "-" if r.ci_low is None else f"{r.ci_low:.0%}-{r.ci_high:.0%}"
        table.add_row(
            str(r.rank), r.label, spread, interval, f"{r.correct}/{r.total}", _pct(r.accuracy_start_mean),
            _num(r.reward_area, ".3f"), _num(r.steps, "g"), _num(r.duration_s, ".0f"), ", ".join(r.failed) or "",
        )
    table.caption = ("final acc: held-out accuracy after the last step, mean and sample sd over the point's seeds; "
                     "pooled 95% CI: Wilson interval of all seeds' final evaluations together; reward area: mean "
                     "training reward over the steps")
    return table


def tenants_table(sweep: Sweep, title: str) -> Any:
    """What ``--check`` shows: every tenant with its point, seed and overrides."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("tenant", "point", "seed", "overrides"):
        table.add_column(column)
    for t in sweep.tenants:
        overrides = sweep.points[t.point].overrides
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(the base)"
        table.add_row(t.name, str(t.point), str(t.seed), shown)
    return table


def _clean(value: Any) -> Any:
    """NaN and infinities as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def results_document(
    sweep: Sweep, rows: Sequence[PointRow], outcomes: Sequence[TenantOutcome], **extra: Any
) -> dict[str, Any]:
    """The ranked points, every tenant's figures and its experiment config, and ``extra`` (e.g. wall time)."""
    configs = {t.name: msgspec.to_builtins(t.experiment) for t in sweep.tenants}
    return _clean({
        **extra,
        "seeds": list(sweep.seeds),
        "model": sweep.runtime.model.source,
        "points": [msgspec.to_builtins(r) for r in rows],
        "tenants": [{**msgspec.to_builtins(o), "experiment": configs[o.name]} for o in outcomes],
    })


def write_results(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def plot_rewards(sweep: Sweep, outcomes: Sequence[TenantOutcome], path: Path, *, title: str = "") -> Path:
    """Every tenant's training reward per step: one colour per point, one line style per seed."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 5.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(sweep.points))]
    seed_style = {seed: LINE_STYLES[i % len(LINE_STYLES)] for i, seed in enumerate(sweep.seeds)}
    for o in outcomes:
        if o.reward_curve:
            ax.plot(range(1, len(o.reward_curve) + 1), o.reward_curve, seed_style[o.seed], color=colors[o.point],
                    marker="o", markersize=3)
    handles = [Line2D([], [], color=colors[p.index], label=p.label) for p in sweep.points]
    if len(sweep.seeds) > 1:
        handles += [Line2D([], [], color="gray", linestyle=seed_style[s], label=f"seed {s}") for s in sweep.seeds]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set(xlabel="step", ylabel="mean training reward", title=title or "reward curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
