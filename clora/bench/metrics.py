"""Pure aggregation of benchmark results: experiment times, step times, throughput, ratios.

Times of a mode are measured from that mode's own start ``t0`` (wall clock, ``time.time()``),
which comes before its runtime start(s): a serial cold mode's clock includes every one of its
runtime starts, a warm or concurrent mode's clock its one runtime start.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from clora.tenant.actor import ExperimentResult

__all__ = ["ModeRow", "aggregate", "serial_prefix_rows", "ratios", "safe_ratio", "reward_curve", "accuracy_vs_serial",
           "overlap_fraction"]


@dataclass(frozen=True)
class ModeRow:
    """One mode at one N: N experiments measured from the mode's start."""

    mode: str  # "serial_cold" | "serial_warm" | "concurrent" | "peer" (the in-repo loop) | "trl" (TRL GRPOTrainer)
    n: int
    first_s: float  # first experiment finished, seconds after the mode's start
    mean_s: float  # mean over experiments of (finish - mode start)
    final_s: float  # last experiment finished (all N done)
    step_s: float  # mean over all steps of rollout + train + sync
    rollout_s: float  # mean rollout time per step
    rollout_sample_s: float  # rollout_s / samples decoded at once (a step's samples x tenants sampling together)
    train_s: float  # mean train time per trained step (0 when none trained)
    sync_s: float  # mean sync time per trained step
    tokens: int  # tokens sampled (training rollouts and evaluations)
    tokens_per_s: float  # tokens / final_s
    peak_rss_gb: float  # peak RSS of the process tree during the mode (whole mode, not only these N)
    accuracy_start: list[float] = field(default_factory=list)  # per experiment, in order
    accuracy_end: list[float] = field(default_factory=list)
    reward_curve: list[float] = field(default_factory=list)  # mean reward over experiments, per step
    runtime_start_s: float = 0.0  # total runtime start time inside this mode's clock
    # What the vLLM engine did during the mode (EngineStatsSnapshot.fields(): prompt_tokens,
    # prompt_tokens_computed, prompt_tokens_cached, decode_batch_mean, busy_s, ...); empty when not measured.
    engine: dict[str, Any] = field(default_factory=dict)
    staleness: int = 0  # the experiments' max_staleness (docs/async.md)
    overlap: float = 0.0  # mean over experiments of overlap_fraction: rollout and train in progress at once
    turns: str = "multi"  # the task: "multi" (Calculator + Final Answer episodes) or "single" (env.single_turn)


def _union(spans: Sequence[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap_fraction(result: ExperimentResult) -> float:
    """Fraction of the experiment's wall time in which it had a rollout and a train step in progress at once
    (0 for the synchronous loop; from the steps' ``rollout_at`` / ``train_at`` spans)."""
    rollouts = [s.rollout_at for s in result.steps if s.rollout_at is not None]
    trains = [s.train_at for s in result.steps if s.train_at is not None]
    both = [(max(a, c), min(b, d)) for a, b in rollouts for c, d in trains if min(b, d) > max(a, c)]
    return _union(both) / result.duration_s if result.duration_s > 0 else 0.0


def reward_curve(results: Sequence[ExperimentResult]) -> list[float]:
    """Mean reward over experiments at each step index (experiments may have different lengths)."""
    longest = max((len(r.steps) for r in results), default=0)
    curve = []
    for i in range(longest):
        values = [r.steps[i].reward_mean for r in results if i < len(r.steps)]
        curve.append(statistics.fmean(values))
    return curve


def aggregate(
    mode: str,
    results: Sequence[ExperimentResult],
    t0: float,
    *,
    peak_rss_bytes: int = 0,
    runtime_start_s: float = 0.0,
    engine: dict[str, Any] | None = None,
    samples_per_step: int = 0,
    staleness: int = 0,
) -> ModeRow:
    """The metrics of ``results`` (all of one mode) against the mode's start ``t0``.

    ``samples_per_step``: rollouts one tenant samples per step (prompts x group size; 0: unknown).
    In a concurrent mode all N tenants sample at once, so a step's rollout time is shared by
    N x ``samples_per_step`` samples; in a serial mode by ``samples_per_step``.
    """
    if not results:
        raise ValueError(f"mode {mode!r}: no results to aggregate")
    ends = [r.finished_at - t0 for r in results]
    steps = [s for r in results for s in r.steps]
    trained = [s for s in steps if s.trained]
    tokens = sum(r.tokens_sampled for r in results)
    final = max(ends)
    rollout_s = _mean([s.time_rollout_s for s in steps])
    at_once = samples_per_step * (len(results) if mode.startswith("concurrent") else 1)
    return ModeRow(
        mode=mode,
        n=len(results),
        first_s=min(ends),
        mean_s=statistics.fmean(ends),
        final_s=final,
        step_s=_mean([s.time_rollout_s + s.time_train_s + s.time_sync_s for s in steps]),
        rollout_s=rollout_s,
        rollout_sample_s=rollout_s / at_once if at_once else math.nan,
        train_s=_mean([s.time_train_s for s in trained]),
        sync_s=_mean([s.time_sync_s for s in trained]),
        tokens=tokens,
        tokens_per_s=tokens / final if final > 0 else 0.0,
        peak_rss_gb=peak_rss_bytes / 2**30,
        accuracy_start=[r.accuracy_start for r in results],
        accuracy_end=[r.accuracy_end for r in results],
        reward_curve=reward_curve(results),
        runtime_start_s=runtime_start_s,
        engine=dict(engine or {}),
        staleness=staleness,
        overlap=statistics.fmean(overlap_fraction(r) for r in results),
    )


def serial_prefix_rows(
    mode: str,
    results: Sequence[ExperimentResult],
    t0: float,
    ns: Sequence[int],
    *,
    peak_rss_bytes: int = 0,
    runtime_starts_s: Sequence[float] = (),
    samples_per_step: int = 0,
) -> list[ModeRow]:
    """Rows for N serial experiments, for each N in ``ns``: the first N of one serial run.

    A serial run of max(ns) experiments contains the serial run of every smaller N (they run
    one after another from the same start), so one run gives every row. ``runtime_starts_s``:
    the start time of each runtime in order (one per experiment when cold, one in all when warm).
    """
    rows = []
    for n in sorted(ns):
        if n > len(results):
            raise ValueError(f"mode {mode!r}: N={n} but only {len(results)} results")
        starts = runtime_starts_s[:n] if len(runtime_starts_s) > 1 else runtime_starts_s
        rows.append(aggregate(mode, results[:n], t0, peak_rss_bytes=peak_rss_bytes, runtime_start_s=sum(starts),
                              samples_per_step=samples_per_step))
    return rows


def safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (a ratio nothing can be said about)."""
    return numerator / denominator if denominator else math.nan


def ratios(row: ModeRow, baseline: ModeRow) -> dict[str, float]:
    """``row`` against the baseline at the same N.

    ``*_speedup`` = baseline time / row time (above 1: the row's experiments are done sooner);
    ``step_time_ratio`` and ``rollout_time_ratio`` = row / baseline (above 1: each step is slower,
    the price of sharing); ``throughput_ratio`` = row tokens/s / baseline tokens/s.
    """
    if row.n != baseline.n:
        raise ValueError(f"ratio of N={row.n} against a baseline with N={baseline.n}")
    return {
        "first_speedup": safe_ratio(baseline.first_s, row.first_s),
        "mean_speedup": safe_ratio(baseline.mean_s, row.mean_s),
        "final_speedup": safe_ratio(baseline.final_s, row.final_s),
        "step_time_ratio": safe_ratio(row.step_s, baseline.step_s),
        "rollout_time_ratio": safe_ratio(row.rollout_s, baseline.rollout_s),
        "throughput_ratio": safe_ratio(row.tokens_per_s, baseline.tokens_per_s),
    }


def accuracy_vs_serial(row: ModeRow, serial: ModeRow) -> dict[str, float | int]:
    """The reference's no-regression criterion: how many of ``row``'s experiments end within the
    serial runs' mean +- 1 standard deviation (or above it) of final held-out accuracy.

    Returns ``serial_mean``, ``serial_sd`` (sample sd; 0 for one serial run), ``within`` (experiments
    whose final accuracy >= serial_mean - serial_sd) and ``of`` (experiments in the row).
    """
    if not serial.accuracy_end:
        raise ValueError("the serial row has no final accuracies")
    mean = statistics.fmean(serial.accuracy_end)
    sd = statistics.stdev(serial.accuracy_end) if len(serial.accuracy_end) > 1 else 0.0
    floor = mean - sd - 1e-9
    return {"serial_mean": mean, "serial_sd": sd, "within": sum(a >= floor for a in row.accuracy_end),
            "of": len(row.accuracy_end)}


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0
