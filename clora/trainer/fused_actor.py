"""FusedTrainerActor: a TrainerActor that fuses pending TrainSteps of different tenants.

``TrainerActor.start_in`` starts this class when ``TrainerConfig.fuse_max`` > 1. Its TrainStep
handler is concurrent: each TrainStep becomes a pending request in a FIFO list and its task
waits for the device lock. Whichever waiting task gets the lock while its own request is still
pending runs the next group (the "combining" pattern; no extra loop task): up to ``fuse_max``
pending requests in arrival order, at most one per tenant (a tenant's later request waits for
the next group, so a tenant's steps stay in order). One request in the group runs the
single-adapter path (``TrainerCore.train_step``, swapped in as before); several run one fused
forward/backward (``TrainerCore.train_steps_fused``). So fusion happens exactly when requests
pile up while the device is busy, and costs nothing when they do not.

Replies and errors are per request: each asker gets its own StepMetrics (``values["fused"]`` =
tenants in its step) or its own exception; a non-finite loss of one tenant rejects only that
tenant. Cancelling an ask whose request is still pending removes it; once its group runs, the
group finishes for everyone (stores are written only after the whole step succeeded, and the
cancelled runner waits for the worker before re-raising), so no store is ever half-written.

Bounds: at most ``FUSED_MAX_PENDING`` TrainSteps are pending (the kernel then stops draining
the mailbox, which is itself bounded by ``queue_size``). Memory grows with ``fuse_max`` only
by the fused tenants' working copies (weights, Adam moments, gradient buffer each);
activations stay bounded by ``micro_batch_size`` rows per forward.

Ordering: TrainSteps keep FIFO order among themselves (per tenant, strictly), but a later
message of another type (Snapshot, ExportAdapter, ...) may run before a TrainStep that is still
pending; await the TrainStep's reply before relying on its result (``ask`` does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from actors import handler
from clora.config import ModelConfig, TrainerConfig
from clora.errors import NonFiniteError
from clora.trainer import FusedRequest, TrainerCore
from clora.messages import StepMetrics, TrainStep
from clora.events import TRAINER_STEP, TRAINER_STEP_REJECTED
from clora.trainer.actor import TrainerActor, step_copies

__all__ = ["FUSED_MAX_PENDING", "FusedTrainerActor"]

FUSED_MAX_PENDING: Final = 64
"""Most TrainSteps pending at once in a FusedTrainerActor (concurrent handler bound)."""

Outcome = dict[str, float] | BaseException


@dataclass(eq=False)
class _Pending:
    msg: TrainStep
    future: asyncio.Future[StepMetrics]
    enqueued: float  # perf_counter when the handler received it


def _single_step(core: TrainerCore, request: FusedRequest) -> list[Outcome]:
    """The single-adapter path, with its error as the outcome (as the fused path reports them)."""
    try:
        return [core.train_step(request.tenant, request.data, request.loss)]
    except Exception as exc:  # noqa: BLE001 - delivered to this request's asker
        return [exc]


def _train_then_copy(core: TrainerCore, msgs: list[TrainStep]) -> list[tuple[Outcome, dict[str, Any]]]:
    """One group's step (single-adapter path for one request, fused for several), then each
    trained tenant's copies its TrainStep asked for, all in one device job."""
    requests = [FusedRequest(m.tenant, m.data, m.loss) for m in msgs]
    outcomes = _single_step(core, requests[0]) if len(requests) == 1 else core.train_steps_fused(requests)
    results: list[tuple[Outcome, dict[str, Any]]] = []
    for msg, outcome in zip(msgs, outcomes, strict=True):
        copies: dict[str, Any] = {}
        if not isinstance(outcome, BaseException):
            try:
                copies = step_copies(core, msg, outcome)
            except Exception as exc:  # noqa: BLE001 - this tenant's asker sees it; the others go on
                outcome = exc
        results.append((outcome, copies))
    return results


class FusedTrainerActor(TrainerActor):
    """TrainerActor whose TrainSteps of different tenants share one step, up to ``fuse_max``."""

    def __init__(self, model: ModelConfig | str | Path, config: TrainerConfig = TrainerConfig()) -> None:
        super().__init__(model, config)
        self._pending: deque[_Pending] = deque()

    def _queue_depth(self) -> int:
        return self.ref.stats.depth + len(self._pending)

    @handler(concurrent=True, max_concurrency=FUSED_MAX_PENDING)
    async def train_step(self, msg: TrainStep) -> StepMetrics:
        pending = _Pending(msg, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(pending)
        try:
            while not pending.future.done():
                if not await self._lock_unless_done(pending):
                    break  # another task's group ran this request
                try:
                    if pending in self._pending:  # else a group that took it has finished: done
                        await self._run_group(self._take_group())
                finally:
                    self.device_lock.release()
        except asyncio.CancelledError:
            if pending in self._pending:
                self._pending.remove(pending)
            elif pending.future.done() and not pending.future.cancelled():
                pending.future.exception()  # retrieved: the cancellation is what the asker sees
            raise
        return pending.future.result()

    async def _lock_unless_done(self, pending: _Pending) -> bool:
        """Acquire the device lock (True), or return False as soon as ``pending`` is resolved by
        another task's group, so its asker is answered without queueing behind the next step."""
        acquire = asyncio.ensure_future(self.device_lock.acquire())
        try:
            await asyncio.wait({acquire, pending.future}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._drop_acquire(acquire)
            raise
        if pending.future.done():
            self._drop_acquire(acquire)
            return False
        return True  # FIRST_COMPLETED: the lock is ours

    def _drop_acquire(self, acquire: asyncio.Future[bool]) -> None:
        """Give up a lock acquisition: cancel it, or release the lock if it got it anyway."""
        acquire.cancel()  # no effect once it finished
        acquire.add_done_callback(lambda f: None if f.cancelled() else self.device_lock.release())

    def _take_group(self) -> list[_Pending]:
        """Up to fuse_max pending requests in arrival order, one per tenant; never empty."""
        group: list[_Pending] = []
        tenants: set[str] = set()
        for pending in self._pending:
            if len(group) == self.config.fuse_max:
                break
            if pending.msg.tenant not in tenants:
                group.append(pending)
                tenants.add(pending.msg.tenant)
        for pending in group:
            self._pending.remove(pending)
        return group

    async def _run_group(self, group: list[_Pending]) -> None:
        """One (fused) step for ``group`` in the worker; the caller holds the device lock. Every
        request's future is resolved when the worker finishes, even if this task is cancelled."""
        core = self._core()
        start = time.perf_counter()
        try:
            future = self._in_worker(_train_then_copy, core, [p.msg for p in group])
        except BaseException as exc:
            self._resolve(group, [(exc, {})] * len(group), start)
            raise
        future.add_done_callback(lambda f: self._resolve(group, self._outcomes(f, len(group)), start))
        await self._finish(future)

    @staticmethod
    def _outcomes(
        future: asyncio.Future[list[tuple[Outcome, dict[str, Any]]]], size: int
    ) -> list[tuple[Outcome, dict[str, Any]]]:
        if future.cancelled():
            return [(RuntimeError("the trainer's worker was shut down before the step ran"), {})] * size
        exc = future.exception()
        return [(exc, {})] * size if exc is not None else future.result()

    def _resolve(self, group: list[_Pending], outcomes: list[tuple[Outcome, dict[str, Any]]], start: float) -> None:
        """Log each request's canonical event and resolve its future (in the event loop thread)."""
        duration = round(time.perf_counter() - start, 4)
        depth = self._queue_depth()
        for pending, (outcome, copies) in zip(group, outcomes, strict=True):
            tenant = pending.msg.tenant
            wait_s = round(start - pending.enqueued, 4)
            if isinstance(outcome, BaseException):
                if isinstance(outcome, NonFiniteError):
                    store = self.core.stores.get(tenant) if self.core is not None else None
                    self.log.warning(
                        TRAINER_STEP_REJECTED, tenant=tenant, version=store.version if store else None,
                        error=str(outcome), duration_s=duration, queue_depth=depth, fused=len(group),
                    )
                if not pending.future.done():
                    pending.future.set_exception(outcome)
                continue
            version = int(outcome["version"])
            self.log.info(
                TRAINER_STEP, tenant=tenant, duration_s=duration, queue_depth=depth, wait_s=wait_s,
                **{**outcome, "version": version, "step": version},
            )
            if not pending.future.done():
                pending.future.set_result(StepMetrics(tenant=tenant, version=version, values=outcome, **copies))
