"""The peers of ``clora bench concurrency --peer``: what a user would run instead of clora, one
experiment after another, and how clora's rows compare with them.

* ``loop`` (row mode ``peer``): the in-repo transformers + peft loop (clora.bench.peer) with clora's
  own rollouts, rewards and loss. It runs both task variants, multi-turn included; by default one
  experiment (``--peer-experiments``).
* ``trl`` (row mode ``trl``): Hugging Face TRL's ``GRPOTrainer`` (clora.bench.trl_peer), each
  experiment in its own process. TRL cannot run the multi-turn task, so it runs the single-turn
  variant only; by default as many experiments as the largest N, so every N has a TRL serial row.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from clora.bench.metrics import ModeRow, safe_ratio, serial_prefix_rows
from clora.bench.rss import PeakRss
from clora.config import ExperimentConfig, ModelConfig

__all__ = ["PEERS", "PEER_MODES", "run_peer", "peer_comparison"]

PEERS = ("loop", "trl")
"""``--peer`` choices."""

PEER_MODES = {"loop": "peer", "trl": "trl"}
"""The row mode of each peer."""

CLORA_MODES = ("serial_cold", "serial_warm", "concurrent")


async def run_peer(peer: str, exps: Sequence[ExperimentConfig], model: ModelConfig, ns: Sequence[int], *,
                   count: int, bf16: bool, samples_per_step: int, on_step: Any = None) -> list[ModeRow]:
    """The first ``count`` of ``exps`` with ``peer``, one after another; rows for each N <= count
    (the first N experiments of the one serial run, as clora's serial rows)."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; use one of {', '.join(PEERS)}")
    if peer == "trl":
        from clora.bench.trl_peer import check_trl_experiment, run_trl_experiment

        for exp in exps[:count]:  # before the first process starts: a bad setting fails at once
            check_trl_experiment(exp)
    else:
        from clora.bench.peer import run_peer_experiment
    results = []
    with PeakRss() as peak:
        t0 = time.time()
        for exp in exps[:count]:
            if peer == "trl":
                results.append(await run_trl_experiment(exp, model, bf16=bf16, on_step=on_step))
            else:
                results.append(await run_peer_experiment(exp, model, on_step=on_step))
    rows_ns = [n for n in ns if n <= count] or [count]
    return serial_prefix_rows(PEER_MODES[peer], results, t0, rows_ns, peak_rss_bytes=peak.bytes,
                              samples_per_step=samples_per_step)


def peer_comparison(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer row against clora's rows of the same task and N: ``{mode}_speedup_vs_peer`` = peer
    final time / clora final time (above 1: clora's N experiments were done sooner), also for the
    mean time (``{mode}_mean_speedup_vs_peer``), and the mean final accuracy of both."""
    by_key = {(i["mode"], i.get("turns", "multi"), i["n"]): i for i in items}
    out = []
    for item in items:
        if item["mode"] not in PEER_MODES.values():
            continue
        turns, n = item.get("turns", "multi"), item["n"]
        entry = {"peer": item["mode"], "turns": turns, "n": n, "peer_final_s": item["final_s"],
                 "peer_mean_s": item["mean_s"], "peer_accuracy_end": _mean(item["accuracy_end"])}
        for mode in CLORA_MODES:
            other = by_key.get((mode, turns, n))
            if other is not None:
                entry[f"{mode}_final_s"] = other["final_s"]
                entry[f"{mode}_speedup_vs_peer"] = safe_ratio(item["final_s"], other["final_s"])
                entry[f"{mode}_mean_speedup_vs_peer"] = safe_ratio(item["mean_s"], other["mean_s"])
                entry[f"{mode}_accuracy_end"] = _mean(other["accuracy_end"])
        out.append(entry)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
