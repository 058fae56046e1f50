"""vLLM processes that clora started exit when their parent dies, instead of living on as orphans.

vLLM runs the engine in child processes (EngineCore, then its workers). When the runtime process
is killed with SIGKILL (OOM killer, ``kill -9`` of one pid), nothing tells them: they keep their
memory and cores until someone kills them by hand. clora's engine environment carries
``CLORA_ENGINE_OWNER_PID`` (the runtime's pid); ``register()``, a vLLM general plugin that vLLM
calls in each of its processes, starts a daemon thread in every multiprocessing child other than
the owner that watches its own parent. When the parent is gone (the process was re-parented) it exits with
status ``ORPHAN_EXIT_STATUS``. The watch is a chain: the EngineCore watches the runtime, each
worker watches the EngineCore.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["ENV_OWNER_PID", "ORPHAN_EXIT_STATUS", "POLL_S", "register", "watch_parent"]

ENV_OWNER_PID = "CLORA_ENGINE_OWNER_PID"
ORPHAN_EXIT_STATUS = 70
POLL_S = 0.5

_started = False


def _exit_orphaned(parent_pid: int) -> None:
    print(f"clora: parent process {parent_pid} is gone; vLLM process {os.getpid()} exits", file=sys.stderr, flush=True)
    os._exit(ORPHAN_EXIT_STATUS)


def watch_parent(
    parent_pid: int, *, poll_s: float = POLL_S, on_orphaned: Callable[[int], None] = _exit_orphaned
) -> threading.Thread:
    """Start a daemon thread that calls ``on_orphaned(parent_pid)`` once this process's parent is
    no longer ``parent_pid`` (it died and the process was re-parented)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        on_orphaned(parent_pid)

    thread = threading.Thread(target=watch, name="clora-parent-watch", daemon=True)
    thread.start()
    return thread


def register() -> None:
    """vLLM general-plugin hook: in a multiprocessing child of clora's runtime (directly or not),
    watch the parent. Other processes that inherited the variable are left alone."""
    global _started
    owner = os.environ.get(ENV_OWNER_PID, "")
    if _started or not owner.isdigit() or int(owner) == os.getpid() or multiprocessing.parent_process() is None:
        return
    _started = True
    watch_parent(os.getppid())
