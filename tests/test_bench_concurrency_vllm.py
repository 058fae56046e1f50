"""CI smoke: ``clora bench concurrency --quick`` on the tiny model completes and its output is well formed.

Real vLLM-CPU; four runtime starts (two cold serial, one shared warm, one fused). No timing assertions.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import structlog

from clora.cli.main import EXIT_OK, main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROW_KEYS = {"mode", "n", "first_s", "mean_s", "final_s", "step_s", "rollout_s", "train_s", "sync_s", "tokens",
            "tokens_per_s", "peak_rss_gb", "accuracy_start", "accuracy_end", "reward_curve", "ratios"}
RATIO_KEYS = {"first_speedup", "mean_speedup", "final_speedup", "step_time_ratio", "rollout_time_ratio",
              "throughput_ratio"}


@pytest.fixture(autouse=True)
def _small_kv_cache_and_structlog(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


def test_quick_benchmark_writes_well_formed_results(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "concurrency", "--quick", "--n", "1,2", "--steps", "2", "--peer", "--fused-n", "2",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
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


def test_only_the_chosen_modes_run_and_rows_without_a_baseline_have_no_ratios(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "concurrency", "--quick", "--modes", "concurrent", "--n", "1", "--steps", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["mode"], r["n"], r["ratios"]) for r in rows] == [("concurrent", 1, {})]
    assert not (out / "runs" / "serial_cold_exp0").exists()
