"""Benchmark helpers: metric aggregation (pure), peak RSS of the process tree, report output.

The helpers load on first use (PEP 562), so importing one benchmark module (``clora.bench.fused``,
``clora.bench.gpu``) does not import the tenant actor and psutil that the others need.
"""

from __future__ import annotations

import importlib
from typing import Any

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

_LAZY = {name: "clora.bench.metrics" for name in __all__[:6]} | {name: "clora.bench.rss" for name in __all__[6:]}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clora.bench' has no attribute {name!r}")
