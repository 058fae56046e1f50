"""The base model's held-out scores, computed once per runtime and shared by the tenants that need them.

A tenant's version 0 is the pristine adapter (B = 0: clora.trainer.store), so it decodes exactly as the
base model does, and the evaluation before its first step is the base model's score on its held-out set.
Tenants that start together with the same env and evaluation settings (a sweep, the demo, a benchmark's
N experiments) would each compute that same score; with this memo the first one computes it and the
others await its result. A computation that fails or is cancelled is not shared: each tenant waiting on
it computes its own, so one tenant's failure never becomes another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec

from clora.config import ExperimentConfig
from clora.rl.accuracy import HeldOutScore

__all__ = ["BaseScores", "base_score_key"]


def base_score_key(experiment: ExperimentConfig, max_model_len: int) -> bytes:
    """What the base model's held-out score depends on: the env (kind, difficulty, held-out seed and size,
    worked examples, turns) and the evaluation's sampling (greedy, ``max_tokens``, the context length)."""
    return msgspec.json.encode((experiment.env, experiment.max_tokens, max_model_len))


class BaseScores:
    """Base-model held-out scores by ``base_score_key``, each computed at most once at a time."""

    def __init__(self) -> None:
        self._scores: dict[bytes, asyncio.Future[tuple[HeldOutScore, str]]] = {}

    async def get(
        self, key: bytes, tenant: str, compute: Callable[[], Awaitable[HeldOutScore]]
    ) -> tuple[HeldOutScore, str]:
        """The score for ``key`` and the tenant that computed it: a score already known or being computed
        by another tenant is awaited; otherwise ``compute()`` runs here and its score is kept for the rest."""
        while True:
            pending = self._scores.get(key)
            if pending is None:
                return await self._compute(key, tenant, compute)
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this tenant was cancelled while it waited
                # the computing tenant failed or was cancelled: the next one in line computes its own

    async def _compute(
        self, key: bytes, tenant: str, compute: Callable[[], Awaitable[HeldOutScore]]
    ) -> tuple[HeldOutScore, str]:
        pending: asyncio.Future[tuple[HeldOutScore, str]] = asyncio.get_running_loop().create_future()
        self._scores[key] = pending
        try:
            score = await compute()
        except BaseException:
            del self._scores[key]
            pending.cancel()
            raise
        pending.set_result((score, tenant))
        return score, tenant
