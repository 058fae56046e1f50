"""The clora command as a separate process: fast help, and Ctrl-C leaves the runtime cleanly (exit 130)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs `clora run` with a stand-in for clora.runtime whose experiments never end, so the test can
# press Ctrl-C mid-run. The stand-in writes "ready" when running and how its context manager exited.
FAKE_RUN = """
import asyncio, sys, types
from pathlib import Path

ready, exited, config, crash = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "crash"

class Runtime:
    def __init__(self, config, *, run_dir=None, console_level="info"):
        pass
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(0.2)  # cleanup that awaits must still run
        exited.write_text(exc_type.__name__ if exc_type else "clean")
        if crash:  # what a dying vLLM engine does: an actor crash leaves the runtime instead
            raise RuntimeError("actor 'sampler' crashed: the vLLM engine died")
    async def run_many(self, experiments, on_step=None):
        ready.write_text("ready")
        await asyncio.sleep(3600)

module = types.ModuleType("clora.runtime")
module.Runtime = Runtime
sys.modules["clora.runtime"] = module
from clora.cli.main import main
sys.exit(main(["run", config]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING"}


def test_help_in_a_fresh_process_is_fast_and_imports_no_ml_stack():
    code = "import sys; from clora.cli.main import main; rc = main(['--help']); " \
           "print('HEAVY' if {'torch', 'vllm', 'matplotlib'} & set(sys.modules) else 'LIGHT'); sys.exit(rc)"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: clora" in proc.stdout and proc.stdout.strip().endswith("LIGHT")
    assert time.perf_counter() - started < 10


def test_python_dash_m_and_the_console_script_agree():
    proc = subprocess.run([sys.executable, "-m", "clora.cli.main", "bench", "nope"], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2 and "unknown benchmark 'nope'" in proc.stderr
    script = shutil.which("clora", path=str(Path(sys.executable).parent))
    if script is not None:  # present after `pip install -e .` (make install)
        proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=_env(), timeout=60)
        assert proc.returncode == 0 and "usage: clora" in proc.stdout


def _ctrl_c_on() -> None:
    """In the child before exec: SIGINT at its default, as a shell starts a command, whatever this
    process inherited (an ignored SIGINT is inherited, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
@pytest.mark.parametrize("on_exit", ["clean", "crash"])
def test_ctrl_c_exits_130_after_the_runtime_left_its_context_manager(tmp_path, on_exit):
    config = tmp_path / "run.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n[[experiments]]\nname = "a"\n')
    ready, exited = tmp_path / "ready", tmp_path / "exited"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(ready), str(exited), str(config), on_exit],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_ctrl_c_on)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the fake run never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert exited.read_text() == "CancelledError"  # the runtime was exited through `async with`
    assert "interrupted" in out and "Traceback" not in err
    assert ("engine died" in out) == (on_exit == "crash")  # the error while stopping is shown, not raised
