"""Terminal output for commands and scripts: structlog lines on stderr and a progress bar per tenant.

The library never configures structlog; a command (``clora run``) or a script calls
``configure_console_logging`` once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = ["configure_console_logging", "ProgressBars"]


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at write time, so rich's live display can redirect it."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


# Python warnings of the ML stack that say nothing to a clora user (the engine's processes get them
# through PYTHONWARNINGS): vLLM's engine leaves a shared-memory segment to Python's resource tracker,
# which warns at exit; vLLM's Triton dispatcher uses a deprecated torch name.
_IGNORED_WARNINGS = (
    ("resource_tracker", UserWarning),
    ("`torch.distributed.reduce_op` is deprecated", FutureWarning),
)


def _silence_vllm_import_warnings() -> None:
    """vLLM logs a few warnings while it is imported, before it configures its logging; with no handler
    anywhere Python prints them bare on stderr (logging.lastResort). When vLLM is to log errors only,
    a NullHandler takes them. vLLM's own configuration replaces its handlers later."""
    if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() in ("ERROR", "CRITICAL"):
        logging.getLogger("vllm").addHandler(logging.NullHandler())


_silence_vllm_import_warnings()  # in an engine process that imports this script's modules again, too


def configure_console_logging(level: str = "warning") -> None:
    """Readable structlog lines on stderr, and a quiet ML stack: vLLM logs errors only unless ``level``
    is debug or info (then that level), torch's C++ warnings, library progress bars (transformers'
    weight loading) and a few meaningless Python warnings are off, here and in the engine's processes.
    An environment variable set already (VLLM_LOGGING_LEVEL, TORCH_CPP_LOG_LEVEL,
    HF_HUB_DISABLE_PROGRESS_BARS, PYTHONWARNINGS) wins."""
    import structlog

    verbose = level in ("debug", "info")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level.upper() if verbose else "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "INFO" if verbose else "ERROR")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}:{c.__name__}" for m, c in _IGNORED_WARNINGS))
    for message, category in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    _silence_vllm_import_warnings()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        logger_factory=lambda *args: _StderrLogger(),
    )


class ProgressBars:
    """One rich progress bar per experiment; ``on_step`` is a Runtime ``on_step`` callback.

        with ProgressBars(console, config.experiments) as progress:
            await rt.run_many(config.experiments, on_step=progress.on_step)
    """

    def __init__(self, console: Any, experiments: Iterable[Any], *, done: dict[str, int | None] | None = None) -> None:
        """``done``: steps each tenant completed before (its checkpoint's step, when resuming)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.experiments = {e.name: e for e in experiments}
        done = done or {}
        columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._progress = Progress(*columns, console=console)
        self._bars = {
            name: self._progress.add_task(
                f"{name} resuming after step {done[name]}" if done.get(name) else f"{name} evaluating",
                total=e.steps, completed=done.get(name) or 0,
            )
            for name, e in self.experiments.items()
        }

    def __enter__(self) -> "ProgressBars":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._progress.__exit__(*exc_info)

    def on_step(self, tenant: str, record: Any) -> None:
        skipped = "" if record.trained else " (skipped)"
        last = " - final eval" if record.step == self.experiments[tenant].steps else ""
        self._progress.update(self._bars[tenant], completed=record.step, description=(
            f"{tenant} step {record.step} reward {record.reward_mean:.2f} v{record.adapter_version}{skipped}{last}"
        ))

    def completed(self, tenant: str) -> float:
        return self._progress.tasks[self._bars[tenant]].completed
