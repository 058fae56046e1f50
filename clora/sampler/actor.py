"""SamplerActor: the vLLM engine as an actor. Tenants' requests decode in shared, mixed batches.

A registered tenant's adapter has one vLLM LoRA id; a new version replaces the weights under
that id in place. Every ``SampleResult`` names the adapter version that produced all of its
tokens: while a tenant's adapter is being replaced, the tenant is gated (its new requests wait,
its in-flight requests finish first), so no sequence mixes versions. Other tenants keep decoding
throughout. With ``LoadAdapter.keep_serving`` (off-policy tenants, docs/async.md) nobody waits:
the new version loads under a new LoRA id beside the old one, new requests go to it at once,
the old version's requests finish on it, and it is unloaded when its last one ends
(clora.sampler.versions). Base-model requests (``tenant=None``) use the engine's
reserved all-zero adapter (see ``clora.sampler.engine``).

Admission: vLLM batches at most ``engine.max_loras`` tenant adapters, so at most that many tenants
have requests in the engine at once; the others wait at a ``SlotGate`` whose order the runtime's
``Scheduler`` decides (priority, weighted fair share, aging: clora.sched). Before that, a tenant's new
request waits at a ``YieldGate`` while a higher class is active (``scheduler.yield_to_higher``; its
requests already in the engine finish). More tenants than the engine keeps adapters for are paged in
and out (clora.sampler.paging).

Errors: a bad request (unknown tenant, prompt too long) fails only that request; an adapter
that does not fit fails its Register/Load; a dead engine is fatal and crashes the actor.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


import msgspec

from actors import Actor, handler
from clora import events
from clora.config import EngineConfig, ModelConfig
from clora.sampler.paging import AdapterPager
from clora.sampler.engine import Engine
from clora.sampler.adapter_names import adapter_name
from clora.sampler.engine_stats import EngineStatsSnapshot
from clora.sampler.stats_log import STATS_INTERVAL_S, EngineStatsLog
from clora.sched import DECODE, Scheduler, YieldGate
from clora.sched.gate import SlotGate
from clora.errors import ConfigError, DuplicateTenantError, EngineDeadError, UnknownTenantError
from clora.sampler.versions import RetiringVersions
from clora.messages import (
    AdapterLoaded,
    GetEngineStats,
    LoadAdapter,
    RegisterAdapter,
    RemoveAdapter,
    SampleRequest,
    SampleResult,
    SamplerMsg,
)

__all__ = [
    "SamplerActor",
    "BASE_VERSION",
]

BASE_VERSION = -1  # SampleResult.adapter_version of base-model requests



class _EngineDied(msgspec.Struct, frozen=True):
    """Told to itself when the engine died, so the actor crashes (asks only fail their caller)."""

    error: str


@dataclass(eq=False)
class _TenantSlot:
    """One tenant's adapter in the engine and the gate that keeps versions unmixed."""

    tenant: str
    lora_id: int
    version: int
    path: Path
    in_flight: int = 0
    admission: asyncio.Future[None] | None = None  # its hold on one of the engine's LoRA slots (+ page-in)
    resident: bool = False  # its adapter is loaded in the engine (else paged out: clora.sampler.paging)
    last_scheduled: float = 0.0  # when it last got an engine LoRA slot (page-out order)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when in_flight == 0
    open: asyncio.Event = field(default_factory=asyncio.Event)  # cleared while the adapter changes
    retired: bool = False  # a newer version serves beside it: unload once in_flight == 0
    gate_key: str = ""  # its name at the SlotGate: the tenant's, or its own while an older version holds that

    def __post_init__(self) -> None:
        self.gate_key = self.gate_key or self.tenant
        self.idle.set()
        self.open.set()

    @property
    def adapter(self) -> tuple[str, int, Path]:
        return (adapter_name(self.tenant, self.lora_id, self.version), self.lora_id, self.path)


class SamplerActor(Actor):
    """Owns one vLLM engine (or borrows ``engine``, which it then neither starts nor shuts down)."""

    mailbox_size = 256
    inbox = SamplerMsg | _EngineDied  # + the message it tells itself when the engine dies

    def __init__(
        self,
        model_dir: Path,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        work_dir: Path | None = None,
        shared_engine: Engine | None = None,
        stats_interval_s: float = STATS_INTERVAL_S,
        scheduler: Scheduler | None = None,
        max_resident: int | None = None,
    ) -> None:
        """``scheduler``: decides which waiting tenant gets the next engine LoRA slot (the runtime's one,
        shared with the trainer; default: a scheduler of its own, everyone in one class). ``max_resident``:
        tenant adapters kept in the engine, the rest paged (default ``engine.cpu_loras``)."""
        self._model_dir = Path(model_dir)
        self._model_cfg = model
        self._engine_cfg = engine
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._owns_work_dir = work_dir is None
        self._engine: Engine | None = shared_engine
        self._owns_engine = shared_engine is None
        self._tenants: dict[str, _TenantSlot] = {}
        self._retiring = RetiringVersions(self._unload_retired)  # old versions finishing their requests
        self._admin_locks: dict[str, asyncio.Lock] = {}
        # vLLM batches at most max_loras + 1 adapters, and the pinned zero adapter holds one of those
        # slots for good, while vLLM's scheduler counts only requested adapters: a batch with more than
        # max_loras tenant adapters kills the engine (KeyError in vLLM's LoRA mapping). So at most
        # max_loras tenants have requests in the engine at once; the others wait here, in the
        # scheduler's order.
        self._owns_scheduler = scheduler is None
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self._lora_slots = SlotGate(self.scheduler, DECODE, engine.max_loras)
        self._yields = YieldGate(self.scheduler)  # new requests of a lower class wait while a higher one is active
        resident = max_resident if max_resident is not None else engine.cpu_loras
        if resident <= engine.max_loras:
            raise ConfigError(f"max_resident ({resident}) must exceed engine.max_loras ({engine.max_loras})")
        self.pager = AdapterPager(resident, log=lambda: self.log, in_engine=self._lora_slots.holds,
                                  changing=lambda t: t in self._tenants and not self._tenants[t].open.is_set())
        self._dead = False
        self._stats_log = EngineStatsLog(lambda: self.log, stats_interval_s)

    # ------------------------------------------------------------------ lifecycle

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the sampler's engine is not running")
        return self._engine

    async def on_start(self) -> None:
        if self._owns_scheduler:
            self.scheduler.log = self.log
        if not self._owns_engine:
            self._start_stats()
            return
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="clora-sampler-"))
        started = time.perf_counter()
        try:
            self._engine = await Engine.start(self._model_dir, self._model_cfg, self._engine_cfg,
                                              work_dir=self._work_dir)
        except BaseException:
            self._shutdown()  # on_failure does not run for a failed start
            raise
        self.log.info(
            events.ENGINE_STARTED, model=str(self._model_dir), dtype=self._model_cfg.dtype,
            max_loras=self._engine_cfg.max_loras, max_lora_rank=self._engine_cfg.max_lora_rank,
            duration_s=round(time.perf_counter() - started, 3),
        )
        self._start_stats()

    async def on_stop(self) -> None:
        self._stats_log.maybe_log(final=True)
        if self._owns_engine:
            self._shutdown()
            self.log.info(events.ENGINE_STOPPED)
        else:  # a borrowed engine outlives us: leave it without our adapters
            await self._retiring.close(None if self.engine.is_dead else self.engine.remove_adapter)
            for tenant in list(self._tenants):
                slot = self._tenants.pop(tenant)
                if slot.resident and not self.engine.is_dead:
                    await self.engine.remove_adapter(slot.lora_id)

    async def on_failure(self, exc: BaseException) -> None:
        if isinstance(exc, EngineDeadError) or isinstance(getattr(exc, "cause", None), EngineDeadError):
            self.log.error(events.ENGINE_DIED, error=str(exc))
        if self._owns_engine:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._owns_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ engine statistics

    def _start_stats(self) -> None:
        self._stats_log.start(getattr(self._engine, "stats", None))  # fake engines in tests may keep none

    def engine_stats(self) -> EngineStatsSnapshot | None:
        """The engine's counters since this sampler started (None for an engine without stats)."""
        return self._stats_log.totals()

    @handler
    async def get_engine_stats(self, msg: GetEngineStats) -> EngineStatsSnapshot | None:
        return self.engine_stats()

    # ------------------------------------------------------------------ queries (sync, for tests and stats)

    def serving_version(self, tenant: str) -> int | None:
        slot = self._tenants.get(tenant)
        return slot.version if slot else None

    def in_flight(self, tenant: str) -> int:
        slot = self._tenants.get(tenant)
        return slot.in_flight if slot else 0

    # ------------------------------------------------------------------ sampling

    def _slot(self, tenant: str) -> _TenantSlot:
        slot = self._tenants.get(tenant)
        if slot is None:
            known = sorted(self._tenants) or "none"
            raise UnknownTenantError(f"tenant {tenant!r} has no adapter in the sampler (registered: {known})")
        return slot

    @handler(concurrent=True)
    async def sample(self, msg: SampleRequest) -> SampleResult:
        started = time.perf_counter()
        self.engine.check_prompt(msg.prompt_token_ids, msg.sampling.max_tokens)
        if msg.tenant is None:
            output = await self._generate(msg, None)
            version = BASE_VERSION
        else:
            slot = self._slot(msg.tenant)
            while True:  # not yet in flight: a held request keeps no LoRA slot and no publish waiting
                await self._yields.clear(DECODE, msg.tenant)  # a higher class is active: wait
                slot = self._slot(msg.tenant)  # it may have been removed meanwhile
                if slot.open.is_set():
                    break
                await slot.open.wait()  # the adapter is being replaced: wait for the new version
            version = slot.version
            slot.in_flight += 1
            slot.idle.clear()
            try:
                await self._hold_lora_slot(slot)
                output = await self._generate(msg, slot.adapter)
            finally:
                slot.in_flight -= 1
                if slot.in_flight == 0:
                    self._free_lora_slot(slot)
                    slot.idle.set()
                    if slot.retired:
                        self._retiring.drained(slot)
        self.log.info(
            events.SAMPLE_DONE, tenant=msg.tenant, adapter_version=version, n=msg.sampling.n,
            prompt_tokens=len(msg.prompt_token_ids),
            completion_tokens=sum(len(c.token_ids) for c in output.completions),
            duration_s=round(time.perf_counter() - started, 4),
        )
        self._stats_log.maybe_log()
        return SampleResult(
            tenant=msg.tenant, adapter_version=version,
            prompt_token_ids=output.prompt_token_ids, completions=output.completions,
        )

    async def _hold_lora_slot(self, slot: _TenantSlot) -> None:
        """Wait until the tenant holds an engine LoRA slot (shared by all its in-flight requests) and
        its adapter is in the engine."""
        if slot.admission is None:
            slot.admission = asyncio.ensure_future(self._admit(slot))
        await asyncio.shield(slot.admission)

    async def _admit(self, slot: _TenantSlot) -> None:
        await self._lora_slots.acquire(slot.gate_key)
        slot.last_scheduled = time.monotonic()
        try:
            await self._engine_call(self.pager.page_in(self.engine, slot, lambda: list(self._tenants.values())))
        except BaseException:
            self._lora_slots.release(slot.gate_key)
            raise

    def _free_lora_slot(self, slot: _TenantSlot) -> None:
        """The tenant's last request left: give its slot back (or stop waiting for one)."""
        admission, slot.admission = slot.admission, None
        if admission is None:
            return
        admission.cancel()  # no effect once it was admitted
        admission.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() is not None else self._lora_slots.release(slot.gate_key))

    def lora_slots_free(self) -> int:
        """Engine LoRA slots no tenant holds now (tests, stats)."""
        return self._lora_slots.free

    def resident(self) -> set[str]:
        """Tenants whose adapter is in the engine now (the others are paged out)."""
        return {t for t, s in self._tenants.items() if s.resident}

    async def _generate(self, msg: SampleRequest, adapter):
        try:
            return await self.engine.generate(msg.prompt_token_ids, msg.sampling, adapter)
        except EngineDeadError as e:
            await self._crash(e)
            raise

    async def _crash(self, exc: EngineDeadError) -> None:
        """Engine death is fatal: crash the actor (an exception escaping a told handler does that)."""
        if not self._dead:
            self._dead = True
            await self.ref.tell(_EngineDied(error=str(exc)))

    @handler
    async def _engine_died(self, msg: _EngineDied) -> None:
        raise EngineDeadError(f"the vLLM engine died; the sampler stops: {msg.error}")

    # ------------------------------------------------------------------ adapters

    def _admin_lock(self, tenant: str) -> asyncio.Lock:
        return self._admin_locks.setdefault(tenant, asyncio.Lock())

    @handler(concurrent=True)
    async def register(self, msg: RegisterAdapter) -> AdapterLoaded:
        async with self._admin_lock(msg.tenant):
            if msg.tenant in self._tenants:
                raise DuplicateTenantError(f"tenant {msg.tenant!r} already has an adapter; use LoadAdapter to update it")
            slot = _TenantSlot(tenant=msg.tenant, lora_id=self.engine.allocate_adapter_id(), version=msg.version,
                               path=Path(msg.path))
            async with self.pager.lock:
                if await self._engine_call(self.pager.make_room(self.engine, list(self._tenants.values()),
                                                                keep=msg.tenant)):
                    duration = await self._engine_call(self.engine.add_adapter(*slot.adapter))
                    slot.resident = True
                else:  # every resident adapter is in use: it starts paged out (checked, loaded when admitted)
                    self.engine.check_adapter(slot.path)
                    duration = 0.0
                self._tenants[msg.tenant] = slot
        self.log.info(events.ADAPTER_REGISTERED, tenant=msg.tenant, version=msg.version, lora_id=slot.lora_id,
                      duration_s=round(duration, 4))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=duration)

    @handler(concurrent=True)
    async def load(self, msg: LoadAdapter) -> AdapterLoaded:
        """Replace a tenant's weights in place; its requests sent after the reply use ``msg.version``."""
        async with self._admin_lock(msg.tenant):
            slot = self._slot(msg.tenant)
            path = Path(msg.path)
            self.engine.check_adapter(path)  # fail before gating anyone
            if msg.keep_serving:
                return await self._load_beside(slot, msg, path)
            started = time.perf_counter()
            slot.open.clear()
            try:
                await slot.idle.wait()  # this tenant's in-flight sequences finish on the old version
                gate_wait = time.perf_counter() - started
                new = _TenantSlot(tenant=msg.tenant, lora_id=slot.lora_id, version=msg.version, path=path)
                async with self.pager.lock:  # no page-out of this adapter meanwhile
                    if slot.resident:
                        # Once sent, the engine load runs to its end even if we are cancelled: the
                        # record must match the weights the engine holds.
                        load = asyncio.ensure_future(self.engine.reload_adapter(*new.adapter))
                        try:
                            duration = await self._engine_call(asyncio.shield(load))
                        except asyncio.CancelledError:
                            await asyncio.wait([load])
                            if not load.cancelled() and load.exception() is None:
                                slot.version, slot.path = new.version, new.path
                            raise
                    else:  # paged out: its next page-in loads this version
                        duration = 0.0
                    slot.version, slot.path = new.version, new.path
            finally:
                slot.open.set()
        self.log.info(events.ADAPTER_LOADED, tenant=msg.tenant, version=msg.version, duration_s=round(duration, 4),
                      gate_wait_s=round(gate_wait, 4))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=duration)

    async def _load_beside(self, old: _TenantSlot, msg: LoadAdapter, path: Path) -> AdapterLoaded:
        """Load ``msg.version`` under a new LoRA id, then route the tenant's new requests to it; ``old``
        finishes its in-flight requests and is unloaded after the last (``_unload_retired``)."""
        new = _TenantSlot(tenant=msg.tenant, lora_id=self.engine.allocate_adapter_id(), version=msg.version, path=path)
        async with self.pager.lock:
            await self.pager.make_room(self.engine, list(self._tenants.values()), keep=msg.tenant)
            load = asyncio.ensure_future(self.engine.add_adapter(*new.adapter))
            try:  # once sent, the load runs to its end: the record must match what the engine holds
                duration = await self._engine_call(asyncio.shield(load))
            except asyncio.CancelledError:
                await asyncio.wait([load])
                if not load.cancelled() and load.exception() is None:
                    self._swap(old, new)
                raise
            self._swap(old, new)
        self.log.info(events.ADAPTER_LOADED_BESIDE, tenant=msg.tenant, version=msg.version, lora_id=new.lora_id,
                      previous_version=old.version, previous_in_flight=old.in_flight, duration_s=round(duration, 4))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=duration)

    def _swap(self, old: _TenantSlot, new: _TenantSlot) -> None:
        new.resident = True
        if any(s.gate_key == new.tenant and s.admission is not None for s in (old, *self._retiring.slots(new.tenant))):
            # an older version holds (or waits for) an engine LoRA slot under the tenant's name: this one
            # counts as its own holder, with the tenant's scheduling policy, until it is unloaded
            new.gate_key = f"{new.tenant}#{new.lora_id}"
            policy = self.scheduler.policy(new.tenant)
            self.scheduler.set_policy(new.gate_key, priority=policy.priority, weight=policy.weight)
        self._tenants[new.tenant] = new
        old.retired = True
        self._retiring.add(old)
        if old.in_flight == 0:
            self._retiring.drained(old)

    async def _unload_retired(self, slot: _TenantSlot) -> None:
        """``slot``'s last request ended and a newer version serves: unload it from the engine."""
        if slot.gate_key != slot.tenant:
            self.scheduler.remove(slot.gate_key)
        try:
            async with self.pager.lock:
                if slot.resident:
                    slot.resident = False
                    await self._engine_call(self.engine.remove_adapter(slot.lora_id))
        except EngineDeadError:
            return  # the actor crashes (told by _engine_call)
        except Exception as e:  # noqa: BLE001 - the version stays loaded, unused; nobody awaits this task
            self.log.warning(events.ADAPTER_RETIRED, tenant=slot.tenant, version=slot.version, lora_id=slot.lora_id,
                             error=str(e))
            return
        self.log.info(events.ADAPTER_RETIRED, tenant=slot.tenant, version=slot.version, lora_id=slot.lora_id)

    def retiring(self, tenant: str) -> list[int]:
        """Versions of ``tenant`` that still finish requests beside the serving one (tests, stats)."""
        return self._retiring.versions(tenant)

    @handler(concurrent=True)
    async def remove(self, msg: RemoveAdapter) -> None:
        """Unload a tenant's adapter after its in-flight requests finish; waiting requests then fail."""
        async with self._admin_lock(msg.tenant):
            slot = self._slot(msg.tenant)
            slot.open.clear()
            try:
                await slot.idle.wait()
                await self._retiring.wait_unloaded(msg.tenant)  # older versions finish their requests too
                async with self.pager.lock:
                    if slot.resident:
                        await self._engine_call(self.engine.remove_adapter(slot.lora_id))
                    del self._tenants[msg.tenant]
            finally:
                slot.open.set()  # waiters wake up and find the tenant gone
        self._admin_locks.pop(msg.tenant, None)
        self.log.info(events.ADAPTER_REMOVED, tenant=msg.tenant, lora_id=slot.lora_id)

    async def _engine_call(self, awaitable):
        try:
            return await awaitable
        except EngineDeadError as e:
            await self._crash(e)
            raise
