"""TensorBoard scalars from a run's events, one TensorBoard run per tenant.

Uses a writer that is already installed (``torch.utils.tensorboard``, which needs the
``tensorboard`` package, or ``tensorboardX``); clora does not depend on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clora.errors import CloraError
from clora import events as names
from clora.observe.spans import Event

__all__ = ["TensorBoardUnavailable", "summary_writer_class", "write_tensorboard"]

_INSTALL_HINT = "pip install tensorboard  (then torch.utils.tensorboard works; or: pip install tensorboardX)"


class TensorBoardUnavailable(CloraError, ImportError):
    """No TensorBoard event writer is installed."""


def summary_writer_class() -> Any:
    """The first SummaryWriter that imports, or TensorBoardUnavailable saying what to install."""
    problems = []
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError as e:
        problems.append(f"torch.utils.tensorboard: {e}")
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError as e:
        problems.append(f"tensorboardX: {e}")
    raise TensorBoardUnavailable(f"TensorBoard scalars need a writer; {_INSTALL_HINT}. Tried: {'; '.join(problems)}")


def _scalars(event: Event) -> dict[str, float]:
    """Numeric metric fields of a step line (slash keys like reward/mean, time/train, train/loss)."""
    out = {}
    for key, value in event.items():
        if ("/" in key or key in ("duration_s", "queue_depth")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            out[key] = float(value)
    return out


def write_tensorboard(events: Sequence[Event], log_dir: str | Path, *, writer_class: Any = None) -> dict[str, int]:
    """Write scalars per tenant under ``log_dir/<tenant>``; returns the number of scalars per tenant.

    ``tenant.step`` metrics go in at their step (wall time from ``ts``), ``tenant.eval`` as
    ``eval/accuracy``.
    """
    writer_class = writer_class or summary_writer_class()
    writers: dict[str, Any] = {}
    written: dict[str, int] = {}
    try:
        for e in sorted(events, key=lambda e: e.get("ts", 0.0)):
            kind, tenant = e.get("event"), e.get("tenant")
            if tenant is None or kind not in (names.TENANT_STEP, names.TENANT_STEP_SKIPPED, names.TENANT_EVAL):
                continue
            tenant = str(tenant)
            if tenant not in writers:
                writers[tenant] = writer_class(log_dir=str(Path(log_dir) / tenant))
                written[tenant] = 0
            values = {"eval/accuracy": float(e["accuracy"])} if kind == names.TENANT_EVAL else _scalars(e)
            for key, value in values.items():
                writers[tenant].add_scalar(key, value, global_step=int(e["step"]), walltime=float(e["ts"]))
                written[tenant] += 1
    finally:
        for writer in writers.values():
            writer.close()
    return written
