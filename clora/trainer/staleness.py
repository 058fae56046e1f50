"""The staleness bound, where data enter the trainer: which of a TrainStep's data may train now.

A datum sampled with adapter version v trains into the tenant's version u (the weights the step's
gradient is taken on and applied to) only if ``u - v <= k`` (``TrainStep.max_staleness``). The
trainer screens each step when its group takes the device: the TrainerActor holds the device lock
then, so u is exactly the version the step will train on (nothing else changes a store without
that lock). ``stale_policy="drop"`` trains the fresh data and drops the rest (all stale: rejected);
``"resample"`` rejects the whole step so the asker samples again. Either way the store is untouched
by what is rejected. Pure: no actor, no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import msgspec

from clora.errors import StaleDataError
from clora.messages import Datum, TrainStep

__all__ = ["Screened", "screen", "staleness_histogram"]


@dataclass(frozen=True)
class Screened:
    """What may train of one TrainStep: ``msg`` (its fresh data only), or ``error`` when nothing may."""

    msg: TrainStep | None
    version: int  # u: the tenant's version the step trains on
    staleness: dict[int, int] = field(default_factory=dict)  # u - v -> data that train
    dropped: tuple[int, ...] = ()  # indices (in the asked step) of the data past the bound
    dropped_versions: tuple[int, ...] = ()  # their sampler versions
    error: StaleDataError | None = None


def staleness_histogram(data: list[Datum], version: int) -> dict[int, int]:
    """u - v -> how many of ``data`` (those with a ``sampler_version``) train into ``version`` u."""
    counts = Counter(version - d.sampler_version for d in data if d.sampler_version is not None)
    return dict(sorted(counts.items()))


def screen(msg: TrainStep, version: int) -> Screened:
    """Screen ``msg`` against its bound for a step on ``version`` (see the module docstring)."""
    if msg.max_staleness is None:
        return Screened(msg=msg, version=version, staleness=staleness_histogram(msg.data, version))
    k = msg.max_staleness
    untagged = tuple(i for i, d in enumerate(msg.data) if d.sampler_version is None)
    if untagged:
        error = StaleDataError(
            f"tenant {msg.tenant!r}: data {list(untagged)} carry no sampler_version, which max_staleness={k} needs",
            untagged,
        )
        return Screened(msg=None, version=version, error=error)
    future = tuple(i for i, d in enumerate(msg.data) if d.sampler_version > version)
    if future:
        error = StaleDataError(
            f"tenant {msg.tenant!r}: data {list(future)} claim sampler versions newer than the trainer's {version}",
            future,
        )
        return Screened(msg=None, version=version, error=error)
    stale = tuple(i for i, d in enumerate(msg.data) if version - d.sampler_version > k)
    if not stale:
        return Screened(msg=msg, version=version, staleness=staleness_histogram(msg.data, version))
    versions = tuple(msg.data[i].sampler_version for i in stale)
    fresh = [d for i, d in enumerate(msg.data) if i not in set(stale)]
    if msg.stale_policy == "resample" or not fresh:
        what = "every datum is" if not fresh else f"{len(stale)} of {len(msg.data)} data are"
        error = StaleDataError(
            f"tenant {msg.tenant!r}: {what} older than max_staleness={k} allows on version {version} "
            f"(sampler versions {sorted(set(versions))}); the step was not trained ({msg.stale_policy})",
            stale,
        )
        return Screened(msg=None, version=version, dropped=stale, dropped_versions=versions, error=error)
    return Screened(
        msg=msgspec.structs.replace(msg, data=fresh), version=version,
        staleness=staleness_histogram(fresh, version), dropped=stale, dropped_versions=versions,
    )
