"""TrainerActor: one actor owns the device and trains every tenant's LoRA on one base model.

Each message runs its torch work in the actor's worker thread under the device lock
(clora.trainer.device_worker), so the event loop (which also streams the sampler's results) never
blocks. A step is never half-written: if the handler is cancelled, it waits for the worker to finish
the step and its store write-back (or to leave the store untouched), then re-raises the cancellation.

TrainSteps wait in a step queue (clora.trainer.step_queue): whichever waiting handler gets the
device lock runs the next group, up to ``TrainerConfig.fuse_max`` steps of different tenants in one
fused forward/backward (1 = one step at a time), tenants in the order the scheduler decides
(clora.sched). Replies and errors stay per asker. Cancelling an ask whose step is still queued
removes it; once its group runs, the group finishes for everyone. A tenant's TrainSteps keep
their order strictly, but a later message of another
type (Snapshot, ExportAdapter, ...) may run before a TrainStep that is still queued: await the
TrainStep's reply before relying on its result (``ask`` does).

Replies: AddTenant -> 0 (the new version), RemoveTenant -> None, TrainStep -> TrainStepResult
(its StepMetrics and the copies it asked for), ForwardBackward / OptimStep -> StepMetrics,
ComputeLogprobs -> list[list[float]], ExportAdapter -> the exported version (int), ImportAdapter
-> the new version (int; weights replaced, optimizer state reset), Snapshot -> AdapterSnapshot, ExportStoreState -> StoreState (a checkpoint's content),
ImportStoreState -> the restored version (int; the whole store replaced). A non-finite loss or
gradient rejects only that step (NonFiniteError to the asker, store unchanged); the actor keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Final

import torch

from actors import Actor, ActorRef, ActorSystem, Supervision, handler
from clora import events
from clora.config import ModelConfig, TrainerConfig
from clora.errors import NonFiniteError
from clora.sched import Scheduler
from clora.trainer.core import TrainerCore
from clora.trainer.cpu_policy import apply_thread_policy, thread_policy
from clora.trainer.device_worker import DeviceWorker
from clora.trainer.staleness import Screened, screen
from clora.trainer.step_queue import GroupOutcome, PendingStep, StepQueue, train_group
from clora.messages import (
    AdapterSnapshot,
    AddTenant,
    ComputeLogprobs,
    ExportAdapter,
    ExportStoreState,
    ForwardBackward,
    ImportAdapter,
    ImportStoreState,
    OptimStep,
    RemoveTenant,
    Snapshot,
    StepMetrics,
    StoreState,
    TrainerMsg,
    TrainStep,
    TrainStepResult,
)

__all__ = [
    "MAX_QUEUED_STEPS",
    "TrainerActor",
]

MAX_QUEUED_STEPS: Final = 64
"""Most TrainSteps queued at once (the concurrent handler's bound; the mailbox behind it is bounded
by ``TrainerConfig.queue_size``)."""


class TrainerActor(Actor):
    """Owns the base model, the device lock and every tenant's AdapterStore.

    ``model`` is a ModelConfig (resolved with clora.models.resolve_model on start) or a HF
    model directory. Start it with ``TrainerActor.start_in(system, model, config)`` so the
    mailbox is bounded by ``TrainerConfig.queue_size`` (or pass ``mailbox_size`` yourself).
    """

    mailbox_size = TrainerConfig().queue_size
    inbox = TrainerMsg

    def __init__(self, model: ModelConfig | str | Path, config: TrainerConfig = TrainerConfig(),
                 scheduler: Scheduler | None = None) -> None:
        """``scheduler``: decides which tenants' pending TrainSteps run next (the runtime's, shared with
        the sampler; default: one of its own, everyone in one class)."""
        self.model = model
        self.config = config
        self.core: TrainerCore | None = None
        self.worker = DeviceWorker()  # its thread runs every torch job, one at a time under its lock
        self._thread_policy: dict[str, Any] = {}  # the worker thread's CPUs, nice value and torch threads
        self._owns_scheduler = scheduler is None
        self._steps = StepQueue(config.fuse_max, scheduler if scheduler is not None else Scheduler())

    @classmethod
    async def start_in(
        cls,
        system: ActorSystem,
        model: ModelConfig | str | Path,
        config: TrainerConfig = TrainerConfig(),
        *,
        name: str = "trainer",
        supervision: Supervision = Supervision.ESCALATE,
        scheduler: Scheduler | None = None,
    ) -> ActorRef[TrainerActor]:
        """Start a trainer in ``system`` with its mailbox bounded by ``config.queue_size``."""
        return await system.start(cls(model, config, scheduler), name=name, supervision=supervision,
                                  mailbox_size=config.queue_size)

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        if self._owns_scheduler:
            self._steps.scheduler.log = self.log
        self.worker.start(f"{self.name}-device")
        start = time.perf_counter()
        try:
            self.core = await self.worker.run(self._load)
        except BaseException:
            self._shutdown()  # on_stop / on_failure do not run when on_start fails
            raise
        self.log.info(
            events.TRAINER_STARTED,
            model_dir=self.core.base_model_name,
            device=str(self.core.device),
            autocast_bf16=self.core.autocast_bf16,
            micro_batch_size=self.config.micro_batch_size,
            shared_prefix=self.core.shared_prefix,
            prefix_off_reason=self.core.prefix_off_reason,
            load_s=round(time.perf_counter() - start, 3),
            cpus=self._thread_policy["cpus"],
            nice=self._thread_policy["nice"],
            threads=self._thread_policy["threads"],
        )

    async def on_stop(self) -> None:
        self._shutdown()

    async def on_failure(self, exc: BaseException) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self.worker.shutdown()

    def _load(self) -> TrainerCore:
        # In the worker thread, before torch starts its intra-op threads from it: they inherit this.
        apply_thread_policy(cpus=self.config.cpus, nice=self.config.nice)
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self._thread_policy = {**thread_policy(), "threads": torch.get_num_threads()}
        from clora.models import check_model_dir, resolve_model

        if isinstance(self.model, ModelConfig):
            model_dir = resolve_model(self.model)
        else:
            model_dir = check_model_dir(Path(self.model))
        return TrainerCore.from_model_dir(model_dir, self.config)

    # ------------------------------------------------------------------ device work

    @property
    def device_lock(self) -> asyncio.Lock:
        """Held while a job runs on the device (tests hold it to keep the device busy)."""
        return self.worker.lock

    def _core(self) -> TrainerCore:
        if self.core is None:
            raise RuntimeError("TrainerActor has no model: on_start did not run")
        return self.core

    def _queue_depth(self) -> int:
        """Messages waiting in the mailbox plus TrainSteps waiting for the device."""
        return self.ref.stats.depth + len(self._steps)

    async def _step(self, event: str, tenant: str, fn: Callable[..., dict[str, float]], *args: Any) -> StepMetrics:
        start = time.perf_counter()
        version_before = self._core().store(tenant).version
        try:
            values = await self.worker.run(fn, tenant, *args)
        except NonFiniteError as exc:
            self.log.warning(
                events.TRAINER_STEP_REJECTED, tenant=tenant, version=version_before, error=str(exc),
                duration_s=round(time.perf_counter() - start, 4), queue_depth=self._queue_depth(),
            )
            raise
        version = int(values["version"])
        fields = {**values, "version": version, "step": version}
        self.log.info(
            event, tenant=tenant, duration_s=round(time.perf_counter() - start, 4),
            queue_depth=self._queue_depth(), **fields,
        )
        return StepMetrics(tenant=tenant, version=version, values=values)

    async def _lock_unless_done(self, pending: PendingStep) -> bool:
        """Acquire the device lock (True), or return False as soon as ``pending`` is resolved by
        another handler's group, so its asker is answered without queueing behind the next step."""
        acquire = asyncio.ensure_future(self.device_lock.acquire())
        scheduler = self._steps.scheduler
        try:
            while not (acquire.done() or pending.future.done()):  # past the wait bound, the scheduler says so
                await asyncio.wait({acquire, pending.future}, timeout=scheduler.wait_bound_s or None,
                                   return_when=asyncio.FIRST_COMPLETED)
                scheduler.check_waits("train")
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

    async def _run_group(self, group: list[PendingStep]) -> None:
        """One (fused) step for ``group`` in the worker; the caller holds the device lock. Every
        step's future is resolved when the worker finishes, even if this task is cancelled."""
        core = self._core()
        start = time.perf_counter()
        group, screened = self._screen(group)
        if not group:
            return
        try:
            future = self.worker.submit(train_group, core, [s.msg for s in screened])
        except BaseException as exc:
            self._resolve(group, [(exc, {})] * len(group), start)
            raise
        future.add_done_callback(lambda f: self._resolve(group, _group_outcomes(f, len(group)), start, screened))
        await self.worker.finish(future)

    def _screen(self, group: list[PendingStep]) -> tuple[list[PendingStep], list[Screened]]:
        """The staleness bound (clora.trainer.staleness) on the versions the group trains on (the
        caller holds the device lock, so they are exact); a rejected step's asker gets its error now."""
        kept: list[tuple[PendingStep, Screened]] = []
        for pending in group:
            store = self._core().stores.get(pending.msg.tenant)
            if store is None:  # unknown tenant: train_group raises the usual error for it
                kept.append((pending, Screened(msg=pending.msg, version=-1)))
                continue
            result = screen(pending.msg, store.version)
            if result.dropped or result.error is not None:
                self.log.warning(
                    events.TRAINER_STALE_DATA, tenant=pending.msg.tenant, version=store.version,
                    max_staleness=pending.msg.max_staleness, policy=pending.msg.stale_policy,
                    stale=len(result.dropped) if result.dropped else len(result.error.stale),
                    of=len(pending.msg.data), sampler_versions=sorted(set(result.dropped_versions)),
                    trained=result.error is None, error=None if result.error is None else str(result.error),
                )
            if result.error is not None:
                if not pending.future.done():
                    pending.future.set_exception(result.error)
                continue
            kept.append((pending, result))
        return [p for p, _ in kept], [s for _, s in kept]

    def _resolve(
        self, group: list[PendingStep], outcomes: list[GroupOutcome], start: float,
        screened: list[Screened] | None = None,
    ) -> None:
        """Log each step's canonical event and resolve its future (in the event loop thread)."""
        self._steps.charge(group, time.perf_counter() - start)
        duration = round(time.perf_counter() - start, 4)
        depth = self._queue_depth()
        screened = screened or [Screened(msg=p.msg, version=-1) for p in group]
        for pending, (outcome, copies), seen in zip(group, outcomes, screened, strict=True):
            tenant = pending.msg.tenant
            if isinstance(outcome, BaseException):
                if isinstance(outcome, NonFiniteError):
                    store = self.core.stores.get(tenant) if self.core is not None else None
                    self.log.warning(
                        events.TRAINER_STEP_REJECTED, tenant=tenant, version=store.version if store else None,
                        error=str(outcome), duration_s=duration, queue_depth=depth, fused=len(group),
                    )
                if not pending.future.done():
                    pending.future.set_exception(outcome)
                continue
            version = int(outcome["version"])
            self.log.info(
                events.TRAINER_STEP, tenant=tenant, duration_s=duration, queue_depth=depth,
                wait_s=round(start - pending.enqueued, 4), **{**outcome, "version": version, "step": version},
                staleness={str(age): n for age, n in seen.staleness.items()}, stale_dropped=len(seen.dropped),
            )
            if not pending.future.done():
                metrics = StepMetrics(tenant=tenant, version=version, values=outcome)
                pending.future.set_result(TrainStepResult(
                    metrics=metrics, staleness=seen.staleness, dropped=len(seen.dropped), **copies
                ))

    # ------------------------------------------------------------------ handlers

    @handler
    async def add_tenant(self, msg: AddTenant) -> int:
        init_from = msg.init_from
        core = self._core()
        store = await self.worker.run(core.add_tenant, msg.tenant, msg.lora, msg.optim, init_from)
        self.log.info(
            events.TRAINER_TENANT_ADDED, tenant=msg.tenant, rank=msg.lora.rank, alpha=msg.lora.alpha,
            targets=list(msg.lora.target_modules), params=store.num_params(), init_from=init_from,
        )
        return store.version

    @handler
    async def remove_tenant(self, msg: RemoveTenant) -> None:
        core = self._core()
        version = core.store(msg.tenant).version
        await self.worker.run(core.remove_tenant, msg.tenant)
        self.log.info(events.TRAINER_TENANT_REMOVED, tenant=msg.tenant, version=version)

    @handler(concurrent=True, max_concurrency=MAX_QUEUED_STEPS)
    async def train_step(self, msg: TrainStep) -> TrainStepResult:
        pending = self._steps.push(msg)
        try:
            while not pending.future.done():
                await self._steps.ready(pending)  # a higher class is active: wait (scheduler.yield_to_higher)
                if not await self._lock_unless_done(pending):
                    break  # another handler's group ran this step
                try:
                    if pending in self._steps:  # else a group that took it has finished: done
                        await self._run_group(self._steps.take_group())
                finally:
                    self.device_lock.release()
        except asyncio.CancelledError:
            self._steps.discard(pending)
            if pending.future.done() and not pending.future.cancelled():
                pending.future.exception()  # retrieved: the cancellation is what the asker sees
            raise
        return pending.future.result()

    @handler
    async def forward_backward(self, msg: ForwardBackward) -> StepMetrics:
        return await self._step(events.TRAINER_FORWARD_BACKWARD, msg.tenant, self._core().forward_backward, msg.data, msg.loss)

    @handler
    async def optim_step(self, msg: OptimStep) -> StepMetrics:
        return await self._step(events.TRAINER_STEP, msg.tenant, self._core().optim_step, msg.optim)

    @handler
    async def compute_logprobs(self, msg: ComputeLogprobs) -> list[list[float]]:
        return await self.worker.run(self._core().compute_logprobs, msg.tenant, msg.data)

    @handler
    async def export_adapter(self, msg: ExportAdapter) -> int:
        start = time.perf_counter()
        snap = await self.worker.run(self._core().export_adapter, msg.tenant, msg.out_dir)
        self.log.info(
            events.TRAINER_EXPORTED, tenant=msg.tenant, version=snap.version, out_dir=msg.out_dir,
            duration_s=round(time.perf_counter() - start, 4),
        )
        return snap.version

    @handler
    async def import_adapter(self, msg: ImportAdapter) -> int:
        version = await self.worker.run(self._core().import_adapter, msg.tenant, msg.path)
        self.log.info(events.TRAINER_IMPORTED, tenant=msg.tenant, version=version, path=msg.path)
        return version

    @handler
    async def snapshot(self, msg: Snapshot) -> AdapterSnapshot:
        return await self.worker.run(self._core().snapshot, msg.tenant)

    @handler
    async def export_store_state(self, msg: ExportStoreState) -> StoreState:
        return await self.worker.run(self._core().store(msg.tenant).export_state)

    @handler
    async def import_store_state(self, msg: ImportStoreState) -> int:
        version = await self.worker.run(self._core().store(msg.tenant).load_state, msg.state)
        self.log.info(events.TRAINER_STATE_RESTORED, tenant=msg.tenant, version=version, adam_step=msg.state.adam_step)
        return version



def _group_outcomes(future: asyncio.Future[list[GroupOutcome]], size: int) -> list[GroupOutcome]:
    if future.cancelled():
        return [(RuntimeError("the trainer's worker was shut down before the step ran"), {})] * size
    exc = future.exception()
    return [(exc, {})] * size if exc is not None else future.result()
