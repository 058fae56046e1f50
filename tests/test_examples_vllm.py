"""The examples keep working: each runs end to end on the tiny model (real vLLM).

They run in this process, on the session's engine (conftest ``borrow_tiny_engine``: the example's own
``clora.Runtime`` borrows it instead of starting one, 20-30 s each here). A fresh process running an
example script, engine start included, is tests/test_demo_vllm.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_scripted_tenant_runs_its_loop_and_saves_a_peft_adapter(tmp_path, monkeypatch, capsys,
                                                                     borrow_tiny_engine):
    example = _example("scripted_tenant")
    monkeypatch.setattr(sys, "argv", ["scripted_tenant.py", "--model", "tiny", "--steps", "2", "--group", "4",
                                      "--run-dir", str(tmp_path)])
    await asyncio.to_thread(example.cli)  # its argument parser and actors.run, as `python examples/...` runs it
    out = capsys.readouterr().out
    assert borrow_tiny_engine == [tmp_path]
    assert re.findall(r"^step (\d): reward", out, re.M) == ["1", "2"]
    assert "bystander still at v0" in out
    saved = tmp_path / "learner-adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()


async def test_embedded_runtime_leaves_the_host_app_running(tmp_path, capsys, borrow_tiny_engine):
    example = _example("embed_in_app")
    await example.app(argparse.Namespace(model="tiny", steps=1, run_dir=str(tmp_path)))  # this loop is the host app
    out = capsys.readouterr().out
    assert borrow_tiny_engine == [tmp_path]
    assert sorted(re.findall(r"^(job\d): accuracy", out, re.M)) == ["job0", "job1"]
    ticks = int(re.search(r"heartbeat stayed alive: (\d+) ticks", out).group(1))
    assert ticks > 10
