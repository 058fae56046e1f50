"""How the trainer's threads share the CPU with the vLLM engine's processes.

On a machine without an accelerator the engine (its OpenMP threads bound to the cores in
``EngineConfig.omp_threads_bind``, by default every core this process may use) and the trainer
(torch's intra-op threads in the trainer's worker thread) compete for the same cores.
``apply_thread_policy`` confines the calling thread and every thread it starts afterwards (torch's
OpenMP team is started by the first parallel region of the thread that runs it) to some cores
and/or lowers its priority, so that a contested core goes to the engine first. Linux scheduler
calls only; elsewhere a policy is refused. No torch import: the caller sets torch's thread count.
"""

from __future__ import annotations

import os
import threading

from clora.config import parse_cpu_list
from clora.errors import ConfigError

__all__ = ["apply_thread_policy", "thread_policy"]


def apply_thread_policy(*, cpus: str | None = None, nice: int = 0) -> None:
    """Confine the calling thread to ``cpus`` and raise its nice value by ``nice`` (0 = unchanged).

    Threads it starts later inherit both. ``cpus`` must be cores this process may use.
    """
    if cpus is None and nice == 0:
        return
    if not hasattr(os, "sched_setaffinity") or not hasattr(threading, "get_native_id"):
        raise ConfigError("trainer cpus / nice need Linux thread scheduling calls, which this platform lacks")
    if cpus is not None:
        wanted = parse_cpu_list(cpus)
        allowed = os.sched_getaffinity(0)
        if not wanted <= allowed:
            raise ConfigError(f"trainer cpus {cpus!r}: this process may only use CPUs {sorted(allowed)}")
        os.sched_setaffinity(0, wanted)  # 0: the calling thread
    if nice:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def thread_policy() -> dict[str, object]:
    """The calling thread's CPUs and nice value (for logs and tests)."""
    return {"cpus": sorted(os.sched_getaffinity(0)),
            "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}
