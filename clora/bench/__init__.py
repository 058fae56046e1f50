"""Benchmark helpers: metric aggregation (pure), peak RSS of the process tree, report output."""

from clora.bench.metrics import ModeRow, aggregate, ratios, reward_curve, safe_ratio, serial_prefix_rows
from clora.bench.rss import PeakRss, tree_rss_bytes

__all__ = [
    "ModeRow",
    "aggregate",
    "ratios",
    "reward_curve",
    "safe_ratio",
    "serial_prefix_rows",
    "PeakRss",
    "tree_rss_bytes",
]
