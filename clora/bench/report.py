"""Benchmark output: the rich table, the JSON document, the PNG plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from clora.bench.metrics import ModeRow, accuracy_vs_serial, ratios

__all__ = ["MODE_ORDER", "rows_with_ratios", "results_table", "markdown_table", "write_json", "plot"]

MODE_ORDER = ("serial_cold", "serial_warm", "concurrent", "concurrent_priority", "concurrent_fused", "peer", "trl")
BASELINE = "serial_cold"


def rows_with_ratios(rows: Sequence[ModeRow]) -> list[dict[str, Any]]:
    """Each row as a dict with ``ratios`` against the serial cold row of the same task and N (when there
    is one) and ``accuracy_vs_serial`` against the serial runs of the same task and N
    (clora.bench.metrics.accuracy_vs_serial: serial cold, else serial warm, whose experiments learn the
    same; {} without either). Multi-turn rows come first, then single-turn rows."""
    baselines = {(r.turns, r.n): r for r in rows if r.mode == BASELINE}
    serial = {(r.turns, r.n): r for r in rows if r.mode == "serial_warm"} | baselines
    ordered = sorted(rows, key=lambda r: (r.turns != "multi", _order(r.mode), r.staleness, r.n))
    out = []
    for row in ordered:
        item = asdict(row)
        key = (row.turns, row.n)
        base = baselines.get(key)
        item["ratios"] = ratios(row, base) if base is not None else {}
        item["accuracy_vs_serial"] = accuracy_vs_serial(row, serial[key]) if key in serial else {}
        out.append(item)
    return out


def _order(mode: str) -> int:
    """A mode's place in tables; ``concurrent_k1`` (max_staleness 1) sorts with ``concurrent``."""
    base = mode.partition("_k")[0] if mode.startswith("concurrent_k") else mode
    return MODE_ORDER.index(base) if base in MODE_ORDER else 99


def _fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def results_table(items: Sequence[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "turns", "N", "first s", "mean s", "final s", "final x", "mean x", "step s", "rollout s",
                   "roll s/sample", "train s", "sync s", "overlap", "tok/s", "peak RSS GB", "acc start->end", "acc ok"):
        if column == "mode":  # never cut a mode's name: readers (and tests) look rows up by it
            table.add_column(column, justify="left", no_wrap=True, min_width=max(map(len, MODE_ORDER)))
        else:
            table.add_column(column, justify="right")
    for item in items:
        r = item["ratios"]
        acc = f"{_mean(item['accuracy_start']):.0%}->{_mean(item['accuracy_end']):.0%}"
        table.add_row(
            item["mode"], item.get("turns", "multi"), str(item["n"]), _fmt(item["first_s"]), _fmt(item["mean_s"]), _fmt(item["final_s"]),
            _fmt(r.get("final_speedup"), ".2f"), _fmt(r.get("mean_speedup"), ".2f"), _fmt(item["step_s"]),
            _fmt(item["rollout_s"]), _fmt(item.get("rollout_sample_s"), ".3f"), _fmt(item["train_s"]),
            _fmt(item["sync_s"], ".2f"), _fmt(item.get("overlap", 0.0), ".0%"), _fmt(item["tokens_per_s"]),
            _fmt(item["peak_rss_gb"], ".2f"), acc,
            _ok_cell(item.get("accuracy_vs_serial") or {}),
        )
    table.caption = ("times in seconds from the start of each mode (runtime starts included); turns: multi = "
                     "Calculator + Final Answer episodes, single = the answer in one turn (env.single_turn); "
                     "x = serial cold time / this time at the same turns and N; roll s/sample = rollout time per step / "
                     "samples decoded at once; acc ok = experiments ending at or above the serial runs' "
                     "mean - 1 sd of final accuracy")
    return table


def _ok_cell(check: dict[str, Any]) -> str:
    return f"{check['within']}/{check['of']}" if check else "-"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _engine_cells(engine: dict[str, Any]) -> list[str]:
    """'computed / cached' prompt tokens and the mean decode batch, '-' when the mode did not measure them."""
    if not engine:
        return ["-", "-"]
    return [f"{engine['prompt_tokens_computed']:,} / {engine['prompt_tokens_cached']:,}",
            _fmt(float(engine["decode_batch_mean"]))]


def _no_regression_cell(check: dict[str, Any]) -> str:
    """'7/8 (serial 50% +- 6%)', or '-' without a serial row at that N."""
    if not check:
        return "-"
    return f"{check['within']}/{check['of']} (serial {check['serial_mean']:.0%} +- {check['serial_sd']:.0%})"


def write_json(path: Path, document: dict[str, Any]) -> Path:
    """NaN is written as null, so the file is strict JSON."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(document), indent=2) + "\n")
    return path


def plot(items: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: final and mean experiment time vs N per mode. Right: mean reward per step for each concurrent N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times_ax, reward_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"serial_cold": "tab:red", "serial_warm": "tab:orange", "concurrent": "tab:blue",
              "concurrent_priority": "tab:purple", "concurrent_fused": "tab:green", "peer": "tab:gray", "trl": "tab:brown"}
    for turns in ("multi", "single"):
        for mode in MODE_ORDER:
            mode_items = [i for i in items if i["mode"] == mode and i.get("turns", "multi") == turns]
            if not mode_items:
                continue
            ns = [i["n"] for i in mode_items]
            color, label = styles[mode], mode if turns == "multi" else f"{mode} (1 turn)"
            alpha = 1.0 if turns == "multi" else 0.55
            times_ax.plot(ns, [i["final_s"] for i in mode_items], "o-", color=color, alpha=alpha, label=f"{label} final")
            times_ax.plot(ns, [i["mean_s"] for i in mode_items], "s--", color=color, alpha=0.7 * alpha,
                          label=f"{label} mean")
    times_ax.set_xlabel("N experiments")
    times_ax.set_ylabel("experiment time (s from mode start)")
    times_ax.set_xscale("log", base=2)
    all_ns = sorted({i["n"] for i in items})
    times_ax.set_xticks(all_ns, [str(n) for n in all_ns])
    times_ax.set_title("experiment time vs N")
    times_ax.legend(fontsize=7)
    for item in items:
        if item["mode"] in ("concurrent", "peer", "trl") and item["reward_curve"]:
            steps = range(1, len(item["reward_curve"]) + 1)
            style = "-" if item["mode"] == "concurrent" else ":"
            turns = "" if item.get("turns", "multi") == "multi" else " (1 turn)"
            reward_ax.plot(steps, item["reward_curve"], style, marker=".", label=f"{item['mode']}{turns} N={item['n']}")
    reward_ax.xaxis.get_major_locator().set_params(integer=True)
    reward_ax.set_xlabel("step")
    reward_ax.set_ylabel("mean reward (over the N experiments)")
    reward_ax.set_title("reward curves")
    reward_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(items: Sequence[dict[str, Any]]) -> str:
    """The results table as GitHub markdown (for docs/benchmarks.md)."""
    head = ("| mode | turns | N | first s | mean s | final s | final x | mean x | first x | step s | rollout s "
            "| rollout s / sample | train s | sync s | overlap | tok/s | peak RSS GB "
            "| prompt tok computed / cached | decode batch "
            "| final acc >= serial mean - sd | accuracy start -> end (per experiment) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for item in items:
        r = item["ratios"]
        acc = ", ".join(f"{a:.0%}->{b:.0%}" for a, b in zip(item["accuracy_start"], item["accuracy_end"]))
        cells = [item["mode"], item.get("turns", "multi"), str(item["n"]), _fmt(item["first_s"]), _fmt(item["mean_s"]), _fmt(item["final_s"]),
                 _fmt(r.get("final_speedup"), ".2f"), _fmt(r.get("mean_speedup"), ".2f"),
                 _fmt(r.get("first_speedup"), ".2f"), _fmt(item["step_s"]), _fmt(item["rollout_s"]),
                 _fmt(item.get("rollout_sample_s"), ".3f"), _fmt(item["train_s"]), _fmt(item["sync_s"], ".2f"),
                 _fmt(item.get("overlap", 0.0), ".0%"), _fmt(item["tokens_per_s"]),
                 _fmt(item["peak_rss_gb"], ".2f"), *_engine_cells(item.get("engine") or {}),
                 _no_regression_cell(item.get("accuracy_vs_serial") or {}), acc]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
