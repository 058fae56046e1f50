"""The examples keep working: each runs end to end on the tiny model (real vLLM) in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent


def _run_example(name: str, *args: str) -> str:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--model", "tiny", *args],
        capture_output=True, text=True, timeout=540, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_scripted_tenant_runs_its_loop_and_saves_a_peft_adapter(tmp_path):
    out = _run_example("scripted_tenant.py", "--steps", "2", "--group", "4", "--run-dir", str(tmp_path))
    assert re.findall(r"^step (\d): reward", out, re.M) == ["1", "2"]
    assert "bystander still at v0" in out
    saved = tmp_path / "learner-adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()


def test_embedded_runtime_leaves_the_host_app_running(tmp_path):
    out = _run_example("embed_in_app.py", "--steps", "1", "--run-dir", str(tmp_path))
    assert sorted(re.findall(r"^(job\d): accuracy", out, re.M)) == ["job0", "job1"]
    ticks = int(re.search(r"heartbeat stayed alive: (\d+) ticks", out).group(1))
    assert ticks > 10
