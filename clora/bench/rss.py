"""Peak resident memory of this process and all its children (vLLM's engine-core process too)."""

from __future__ import annotations

import threading

import psutil

__all__ = ["tree_rss_bytes", "PeakRss"]


def tree_rss_bytes(pid: int | None = None) -> int:
    """RSS of a process plus its live descendants. Shared pages count once per process (an upper bound)."""
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a child that exited between listing and reading
    return total


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.bytes``: the largest tree RSS seen, polled in a thread."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_bytes())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakRss":
        self.bytes = tree_rss_bytes()
        self._thread = threading.Thread(target=self._poll, name="clora-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bytes = max(self.bytes, tree_rss_bytes())
