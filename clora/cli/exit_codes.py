"""Exit codes of the ``clora`` command (see clora.cli.main)."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1  # a tenant or the runtime failed
EXIT_USAGE = 2  # bad input: usage, config, missing files
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells expect after Ctrl-C
