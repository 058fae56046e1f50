"""What the vLLM engine did over a run, from its ``sampler.engine_stats`` / ``sampler.engine_totals`` events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from clora.events import ENGINE_STATS, ENGINE_TOTALS

__all__ = ["engine_summary", "engine_line"]

_SUMMED = ("steps", "busy_s", "prompt_tokens", "prompt_tokens_computed", "prompt_tokens_cached", "generation_tokens",
           "requests_admitted", "decode_steps", "decode_rows")


def engine_summary(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine's counters over the run: the sampler's totals line when it stopped cleanly, else the
    sum of its windows so far. None when the run has neither (an older run, or an engine without stats)."""
    totals = [e for e in events if e.get("event") == ENGINE_TOTALS]
    if totals:
        return dict(totals[-1])
    windows = [e for e in events if e.get("event") == ENGINE_STATS]
    if not windows:
        return None
    out: dict[str, Any] = {key: sum(w.get(key, 0) for w in windows) for key in _SUMMED}
    out["decode_batch_max"] = max(w.get("decode_batch_max", 0) for w in windows)
    batches: Counter[str] = Counter()
    for w in windows:
        batches.update(w.get("decode_batches", {}))
    out["decode_batches"] = dict(batches)
    out["decode_batch_mean"] = out["decode_rows"] / out["decode_steps"] if out["decode_steps"] else 0.0
    return out


def engine_line(summary: dict[str, Any]) -> str:
    """One line for the console: prompt tokens computed vs cached, tokens generated, decode batch sizes."""
    prompt = summary.get("prompt_tokens", 0)
    cached = summary.get("prompt_tokens_cached", 0)
    share = f"{cached / prompt:.0%}" if prompt else "-"
    return (f"engine: {prompt:,} prompt tokens ({summary.get('prompt_tokens_computed', 0):,} computed, {cached:,} "
            f"from the prefix cache = {share}), {summary.get('generation_tokens', 0):,} generated; decode batch mean "
            f"{summary.get('decode_batch_mean', 0.0):.1f} (max {summary.get('decode_batch_max', 0)}) over "
            f"{summary.get('decode_steps', 0):,} steps; engine busy {summary.get('busy_s', 0.0):.0f} s")
