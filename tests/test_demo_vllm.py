"""`make demo` as a new user sees it (tiny model, one step, real vLLM): no warnings from vLLM or any
library, the run's pictures in the run folder, and next commands that work when pasted.

The demo's engine runs in bf16 where the CPU computes bf16 (``dtype="auto"``), else fp32; the bf16 engine's
weights copy, which keeps vLLM's per-tensor "Attempted to load weight" warnings away, is tested in
test_quiet.py either way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clora.cli.main import EXIT_OK, build_parser, main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
QUIET_BY_DEFAULT = ("VLLM_LOGGING_LEVEL", "PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def test_the_demo_is_quiet_draws_its_pictures_and_shows_commands_that_work(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_BY_DEFAULT}  # as a fresh shell has it
    env.update(PYTHONPATH=str(ROOT), CLORA_HOME=str(tmp_path / "home"))
    run_dir = "runs/demo"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--model", "tiny", "--steps", "1", "--held-out", "4",
         "--run-dir", run_dir],
        capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    noisy = [line for line in printed.splitlines() if re.search(r"warn|attempted to load|\d+%\|", line, re.I)]
    assert noisy == [], "\n".join(noisy[:20])
    assert "held-out accuracy" in done.stdout
    assert re.search(r"[-+*/]\d+/\d+", done.stdout), "the final table counts right answers per operation"

    for picture in ("curves.png", "timeline.png"):
        assert (tmp_path / run_dir / picture).stat().st_size > 10_000
    commands = [shlex.split(line.split("#")[0]) for line in done.stdout.splitlines() if line.startswith("  clora ")]
    assert [c[1] for c in commands] == ["events", "export", "sample"]
    monkeypatch.chdir(tmp_path)
    for command in commands[:2]:  # sampling starts an engine again: tests/test_getting_started_vllm.py does it
        assert main(command[1:]) == EXIT_OK, command
    sample = build_parser().parse_args(commands[2][1:])
    assert Path(sample.items[0]).is_dir() and (Path(sample.items[0]) / "adapter_model.safetensors").is_file()
