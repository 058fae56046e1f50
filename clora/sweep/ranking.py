"""A sweep's results per point: accuracy over seeds, its pooled 95% interval, the reward curve's area,
and the ranking (pure; no runtime).

For a point run with seeds s = 1..S, finished tenants only (a failed tenant is listed, not averaged):

* ``accuracy_mean`` = mean over seeds of the final held-out accuracy; ``accuracy_std`` its sample
  standard deviation (0 with one seed), ``accuracy_min`` / ``accuracy_max`` its range;
* ``correct`` / ``total`` = the final evaluations pooled over seeds, and ``ci_low`` .. ``ci_high``
  their 95% Wilson interval (the evidence of all seeds together);
* ``reward_area`` = mean over seeds of the mean training reward over the steps (the area under the
  reward curve per step: a point that learns sooner scores higher at the same final accuracy);
* ``steps`` = mean steps done, ``duration_s`` = mean wall time of a tenant.

Points rank by ``accuracy_mean`` (high first), then ``reward_area``; points with no finished
tenant come last.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import msgspec

from clora.rl.accuracy import HeldOutScore, wilson_interval
from clora.sweep.spec import SweepPoint, SweepTenant

__all__ = ["TenantOutcome", "PointRow", "tenant_outcome", "rank_points"]


class TenantOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's figures: from its ExperimentResult, or its error."""

    name: str
    point: int
    seed: int
    accuracy_start: float | None = None
    accuracy_end: float | None = None
    correct_end: int = 0
    held_out: int = 0
    reward_curve: list[float] = []  # mean training reward of each step, in order
    steps: int = 0
    duration_s: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None


def tenant_outcome(tenant: SweepTenant, result: Any) -> TenantOutcome:
    """``result``: the tenant's ExperimentResult, or the exception it ended with."""
    if isinstance(result, BaseException):
        return TenantOutcome(name=tenant.name, point=tenant.point, seed=tenant.seed,
                             error=f"{type(result).__name__}: {result}")
    end: HeldOutScore = result.score_end
    return TenantOutcome(
        name=tenant.name, point=tenant.point, seed=tenant.seed, accuracy_start=result.accuracy_start,
        accuracy_end=result.accuracy_end, correct_end=end.correct, held_out=end.total,
        reward_curve=[s.reward_mean for s in result.steps], steps=len(result.steps), duration_s=result.duration_s,
    )


class PointRow(msgspec.Struct, frozen=True, kw_only=True):
    """One point of the sweep over its seeds (see the module doc for every figure)."""

    rank: int
    point: int
    label: str
    overrides: dict[str, Any]
    tenants: list[str]
    failed: list[str]
    accuracy_mean: float | None
    accuracy_std: float | None
    accuracy_min: float | None
    accuracy_max: float | None
    accuracy_start_mean: float | None
    correct: int
    total: int
    ci_low: float | None
    ci_high: float | None
    reward_area: float | None
    steps: float | None
    duration_s: float | None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _row(point: SweepPoint, outcomes: Sequence[TenantOutcome]) -> PointRow:
    done = [o for o in outcomes if o.finished]
    finals = [o.accuracy_end for o in done if o.accuracy_end is not None]
    correct, total = sum(o.correct_end for o in done), sum(o.held_out for o in done)
    low, high = wilson_interval(correct, total) if total else (None, None)
    return PointRow(
        rank=0, point=point.index, label=point.label, overrides=dict(point.overrides),
        tenants=[o.name for o in outcomes], failed=[o.name for o in outcomes if not o.finished],
        accuracy_mean=_mean(finals),
        accuracy_std=(statistics.stdev(finals) if len(finals) > 1 else 0.0) if finals else None,
        accuracy_min=min(finals) if finals else None, accuracy_max=max(finals) if finals else None,
        accuracy_start_mean=_mean([o.accuracy_start for o in done if o.accuracy_start is not None]),
        correct=correct, total=total, ci_low=low, ci_high=high,
        reward_area=_mean([statistics.fmean(o.reward_curve) for o in done if o.reward_curve]),
        steps=_mean([float(o.steps) for o in done]), duration_s=_mean([o.duration_s for o in done
                                                                         if o.duration_s is not None]),
    )


def rank_points(points: Sequence[SweepPoint], outcomes: Sequence[TenantOutcome]) -> list[PointRow]:
    """One row per point, best first (rank 1)."""
    rows = [_row(p, [o for o in outcomes if o.point == p.index]) for p in points]

    def key(row: PointRow) -> tuple:
        if row.accuracy_mean is None:
            return (1, 0.0, 0.0, row.point)
        return (0, -row.accuracy_mean, -(row.reward_area or 0.0), row.point)

    ranked = sorted(rows, key=key)
    return [msgspec.structs.replace(row, rank=i) for i, row in enumerate(ranked, start=1)]
