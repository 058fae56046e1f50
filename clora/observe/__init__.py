"""Read a run's events: per-tenant summaries, a timeline of where time goes, learning curves.

Pure functions on event lists (``clora.events.read_events``); no runtime, torch or vLLM needed.
``python -m tools.docgen`` regenerates the event and configuration reference in docs/.
"""

from __future__ import annotations

from clora.observe.engine import engine_line, engine_summary
from clora.observe.plots import PlotInfo, curves, timeline
from clora.observe.spans import Span, all_spans, last_run, load_run_events
from clora.observe.summary import TenantSummary, summarize, summary_table
from clora.observe.tensorboard import TensorBoardUnavailable, write_tensorboard

__all__ = [
    "PlotInfo",
    "Span",
    "TenantSummary",
    "TensorBoardUnavailable",
    "all_spans",
    "curves",
    "engine_line",
    "engine_summary",
    "last_run",
    "load_run_events",
    "summarize",
    "summary_table",
    "timeline",
    "write_tensorboard",
]
