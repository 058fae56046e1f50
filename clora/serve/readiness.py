"""Waiting for a ``clora serve`` process to answer its readiness endpoint (benchmarks and tests that start
the server as a process)."""

from __future__ import annotations

import subprocess
import time

import httpx

__all__ = ["wait_until_ready"]


def wait_until_ready(url: str, process: subprocess.Popen, *, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
    """Return once ``GET {url}/readyz`` answers 200. A process that exits first raises RuntimeError (with the
    end of its stderr when it was piped); no answer within ``timeout_s`` raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = process.stderr.read()[-3000:] if process.stderr is not None else ""
            raise RuntimeError(f"clora serve exited with {process.returncode} before it was ready\n{said}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"clora serve at {url} was not ready within {timeout_s:g} s")
