"""vLLM processes started by clora exit when their parent dies (clora/sampler/parent_watch.py), no vLLM needed.

A chain like the engine's: this test starts a "runtime" process, which starts a "worker" that
loads the plugin the way vLLM does; SIGKILL of the runtime alone must end the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from clora.sampler import parent_watch as vllm_parent_watch

pytestmark = pytest.mark.timeout(60)

RUNTIME = f"""
import multiprocessing, os, subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import parent_watch_worker

if __name__ == "__main__":
    os.environ["{vllm_parent_watch.ENV_OWNER_PID}"] = os.environ["OWNER"]
    if sys.argv[1] == "popen":  # a plain subprocess that inherited the variable, not an engine process
        code = "import sys; sys.path.insert(0, %r); import parent_watch_worker; parent_watch_worker.run()"
        worker = subprocess.Popen([sys.executable, "-c", code % sys.path[0]])
    else:
        worker = multiprocessing.get_context(sys.argv[1]).Process(target=parent_watch_worker.run)
        worker.start()
    sys.stdout.write(f"{{worker.pid}}\\n")  # one write: the worker shares this pipe
    sys.stdout.flush()
    time.sleep(60)
"""


def _start_chain(owner: str, tmp_path: Path, method: str = "spawn") -> tuple[subprocess.Popen, int]:
    """A runtime process whose multiprocessing worker got ``owner`` as the owner pid; returns
    (runtime, worker pid)."""
    script = tmp_path / "runtime.py"
    script.write_text(RUNTIME)
    runtime = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, OWNER=owner))
    # The runtime's pid line and the worker's "registered" line come in either order (a forked worker
    # may be first); each is one write, so lines never mix.
    lines = sorted(runtime.stdout.readline().strip() for _ in range(2))
    assert lines[1] == "registered"  # the worker ran the plugin's hook
    worker_pid = int(lines[0])
    return runtime, worker_pid


def _gone(pid: int, within_s: float) -> bool:
    """The process ended within ``within_s`` (a zombie counts: dead, waiting for its new parent to reap it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_worker_exits_when_the_runtime_is_killed(tmp_path, method):
    runtime, worker = _start_chain("1", tmp_path, method)  # any pid but the worker's own: it watches its parent
    try:
        assert psutil.pid_exists(worker)
        runtime.send_signal(signal.SIGKILL)
        runtime.wait()
        assert _gone(worker, within_s=10), "the orphaned worker kept running"
    finally:
        for pid in (runtime.pid, worker):
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("owner", "method"), [("not-a-pid", "spawn"), ("1", "popen")])
def test_the_owner_itself_and_processes_clora_did_not_start_get_no_watch(tmp_path, owner, method):
    # not-a-pid: no clora engine; popen: not a multiprocessing child. The plugin does nothing.
    runtime, worker = _start_chain(owner, tmp_path, method)
    try:
        runtime.send_signal(signal.SIGKILL)
        runtime.wait()
        assert not _gone(worker, within_s=2), "a process clora did not start must not be touched"
    finally:
        if psutil.pid_exists(worker):
            os.kill(worker, signal.SIGKILL)
    before = {t.name for t in threading.enumerate()}
    os.environ[vllm_parent_watch.ENV_OWNER_PID] = str(os.getpid())
    try:
        vllm_parent_watch.register()  # this process is the owner: no watch here
    finally:
        del os.environ[vllm_parent_watch.ENV_OWNER_PID]
    assert "clora-parent-watch" not in {t.name for t in threading.enumerate()} - before


def test_watch_parent_reports_the_lost_parent():
    seen: list[int] = []
    thread = vllm_parent_watch.watch_parent(os.getppid() + 10**7, poll_s=0.01, on_orphaned=seen.append)
    thread.join(timeout=5)
    assert seen == [os.getppid() + 10**7]
