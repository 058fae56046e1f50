"""EngineStatsLog: the sampler's ``sampler.engine_stats`` lines and its life's totals.

The engine counts what it computes (clora.sampler.engine_stats.EngineStats); this logs the
difference since the last line, at most once per interval as requests finish, and on ``final``
the totals since the sampler started. An engine without counters (fake engines in tests) logs
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from clora import events
from clora.sampler.engine_stats import EngineStats, EngineStatsSnapshot

__all__ = ["EngineStatsLog", "STATS_INTERVAL_S"]

STATS_INTERVAL_S = 10.0  # at most one sampler.engine_stats line per interval


class EngineStatsLog:
    """Windows of an engine's counters, logged through ``log()`` (the owner's bound logger)."""

    def __init__(self, log: Callable[[], Any], interval_s: float = STATS_INTERVAL_S) -> None:
        self._log = log
        self.interval_s = interval_s
        self._stats: EngineStats | None = None
        self._first: EngineStatsSnapshot | None = None  # the counters when the sampler started
        self._last: EngineStatsSnapshot | None = None  # ... at the last line
        self._last_at = time.monotonic()

    def start(self, stats: EngineStats | None) -> None:
        """Count from now on ``stats`` (None: an engine without counters)."""
        self._stats = stats
        if stats is not None:
            self._first = self._last = stats.snapshot()
            self._last_at = time.monotonic()

    def maybe_log(self, *, final: bool = False) -> None:
        """Log what the engine did since the last line (once the interval has passed, or ``final``);
        on ``final`` also the totals since ``start``."""
        if self._stats is None or self._first is None or self._last is None:
            return
        now = time.monotonic()
        if not final and now - self._last_at < self.interval_s:
            return
        window = self._stats.window(self._last)
        if window.steps or window.prompt_tokens:
            self._log().info(events.ENGINE_STATS, window_s=round(now - self._last_at, 3), **window.fields())
        self._last, self._last_at = self._stats.snapshot(), now
        if final:
            totals = self._stats.window(self._first)
            self._log().info(events.ENGINE_TOTALS, **totals.fields())

    def totals(self) -> EngineStatsSnapshot | None:
        """The counters since ``start`` (None for an engine without counters)."""
        if self._stats is None or self._first is None:
            return None
        return self._stats.window(self._first)
