"""SIGKILL of the runtime process alone (not its group): vLLM's engine processes exit by themselves.

Before clora/sampler/parent_watch.py they lived on as orphans, holding the model and both cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import asyncio, sys, time
import clora
from clora.config import EngineConfig, ModelConfig, RuntimeConfig

async def main(model_dir, run_dir):
    config = RuntimeConfig(model=ModelConfig(source=model_dir, max_model_len=256),
                           engine=EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=4, kv_cache_gib=0.5),
                           run_dir=run_dir)
    async with clora.Runtime(config, console_level="warning"):
        print("ready", flush=True)
        await asyncio.sleep(600)

if __name__ == "__main__":  # vLLM spawns its processes: they import this file
    asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, waiting to be reaped
    except psutil.NoSuchProcess:
        return False


def test_killing_the_runtime_process_alone_ends_its_engine_processes(tiny_model_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING"}
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "run")],
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    engine: list[psutil.Process] = []
    try:
        for line in child.stdout:  # vLLM prints to stdout too
            if line.strip() == "ready":
                break
        else:
            pytest.fail("the runtime did not start: " + (tmp_path / "child.log").read_text()[-3000:])
        engine = psutil.Process(child.pid).children(recursive=True)
        assert engine, "the runtime should have started vLLM engine processes"
        child.send_signal(signal.SIGKILL)  # this pid only: nobody tells the engine
        child.wait()
        deadline = time.monotonic() + 30
        while (alive := [p.pid for p in engine if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"orphaned engine processes still running: {alive}"
        said = (tmp_path / "child.log").read_text()
        assert f"clora: parent process {child.pid} is gone" in said  # the watch ended them, nothing else
    finally:
        for proc in [*engine, psutil.Process(child.pid) if child.poll() is None else None]:
            if proc is not None:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
