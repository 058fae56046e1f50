"""SamplerPool: R sampler replicas behind one sampler inbox (docs/sampler-pool.md has the whole story).

An actor with the SamplerActor's inbox (``SamplerMsg``) in front of R sampler ``ActorRef``s: local
SamplerActors (``Runtime(engine=[e1, e2])``, ``start_local_pool``) or proxies of remote ones (the Ray placement
layer hands them to ``start_sampler_pool``). The runtime talks to it as to one sampler, under the same name.
It imports no Ray and no engine.

- Placement: a tenant (every sampler-level name, pinned versions ``tenant@vN`` included) goes to
  ``replicas_per_tenant`` replicas (default 1), those with the fewest tenants. Routing: only to replicas that
  hold the name (affinity), then the least outstanding decode work (sum of ``n * max_tokens`` in flight).
- Publishing: Register/LoadAdapter fan out to every replica of the tenant; the reply comes, and the version is
  live, when all of them serve it. An in-place load holds the tenant's new requests at the pool meanwhile; a
  load refused by some replicas is rolled back on the others. Each SampleResult comes from one replica, which
  names the one version of all its tokens.
- Failover: a replica is dead when an ask raises ``FatalError``, ``ActorCrashed`` or ``ActorStopped``, or its
  ref is not alive. Its tenants are registered on survivors at their live version; a request in flight there
  is retried once on a survivor; a second failure propagates. The last replica's death crashes the pool with
  the sampler's fatal ``EngineDeadError``. Replicas run under ``Supervision.ISOLATE``, the pool under ESCALATE.
- Scheduling: local replicas share the runtime's one ``Scheduler`` object (in-process, so fine): each
  replica's SlotGate picks among its own waiters, but run-time priorities and weights (``Runtime.set_priority``,
  continual pinned versions) reach every replica at once, and a tenant's decode device-seconds add up over
  its replicas (its fair share is of the pool's decode time). A remote replica keeps a scheduler of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors import Actor, ActorCrashed, ActorRef, ActorStopped, ActorSystem, Supervision, handler
from clora import events
from clora.errors import ConfigError, DuplicateTenantError, EngineDeadError, FatalError, UnknownTenantError
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
from clora.sampler.engine_stats import EngineStatsSnapshot, combine_snapshots

__all__ = ["SamplerPool", "is_replica_death", "start_local_pool", "start_sampler_pool"]


class _AllReplicasDied(msgspec.Struct, frozen=True):
    """Told to itself when the last replica died, so the pool crashes like a single sampler."""

    error: str


@dataclass(eq=False)
class _Replica:
    index: int
    ref: ActorRef
    load: int = 0  # outstanding decode work: sum of n * max_tokens of the pool's requests in flight here
    requests: int = 0  # the pool's requests in flight here
    tenants: set[str] = field(default_factory=set)
    dead: bool = False
    error: str | None = None  # what killed it

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass(eq=False)
class _Tenant:
    name: str
    version: int  # the live version: every replica in ``replicas`` serves it
    path: str
    replicas: list[_Replica] = field(default_factory=list)
    open: asyncio.Event = field(default_factory=asyncio.Event)  # cleared while an in-place load fans out

    def __post_init__(self) -> None:
        self.open.set()


def is_replica_death(ref: ActorRef, error: BaseException) -> bool:
    """Whether ``error`` from an ask to replica ``ref`` means the replica is gone (not a failed request)."""
    return isinstance(error, (FatalError, ActorCrashed, ActorStopped)) or not ref.alive


class SamplerPool(Actor):
    """The sampler inbox over several sampler replicas (see the module docstring)."""

    mailbox_size = 256
    inbox = SamplerMsg | _AllReplicasDied

    def __init__(self, replicas: Sequence[ActorRef], *, replicas_per_tenant: int = 1) -> None:
        if not replicas:
            raise ConfigError("a sampler pool needs at least one replica")
        if replicas_per_tenant < 1:
            raise ConfigError(f"replicas_per_tenant must be >= 1, got {replicas_per_tenant}")
        self.replicas = [_Replica(i, ref) for i, ref in enumerate(replicas)]
        self.replicas_per_tenant = replicas_per_tenant
        self._tenants: dict[str, _Tenant] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failovers: dict[int, asyncio.Task[None]] = {}  # replica index -> its tenants' failover
        self._fatal: asyncio.Task[None] | None = None  # telling itself to crash

    async def on_stop(self) -> None:
        await self._end_failovers()

    async def on_failure(self, exc: BaseException) -> None:
        await self._end_failovers()

    async def _end_failovers(self) -> None:
        for task in self._failovers.values():
            task.cancel()
        if self._failovers:
            await asyncio.wait(list(self._failovers.values()))

    # ------------------------------------------------------------------ queries (sync, for tests and stats)

    def placement(self, tenant: str) -> list[str]:
        """Names of the replicas that serve ``tenant`` now."""
        record = self._tenants.get(tenant)
        return [r.name for r in record.replicas] if record else []

    def serving_version(self, tenant: str) -> int | None:
        record = self._tenants.get(tenant)
        return record.version if record else None

    def alive(self) -> list[str]:
        return [r.name for r in self.replicas if self._usable(r)]

    # ------------------------------------------------------------------ replicas: health and choice

    def _usable(self, replica: _Replica) -> bool:
        if replica.dead:
            return False
        if not replica.ref.alive:
            self._lost(replica, replica.ref.failure or ActorStopped(replica.name, "is stopped"))
            return False
        return True

    def _lost(self, replica: _Replica, error: BaseException) -> None:
        """``replica`` died: once, log it and start moving its tenants to the survivors (or fail the pool)."""
        if replica.dead:
            return
        replica.dead = True
        replica.error = f"{type(error).__name__}: {error}"
        survivors = [r for r in self.replicas if self._usable(r)]
        self.log.error(events.REPLICA_FAILED, replica=replica.name, tenants=sorted(replica.tenants),
                       alive=[r.name for r in survivors], error=f"{type(error).__name__}: {error}")
        if not survivors:
            if self._fatal is None:  # fatal, as the last sampler's death is: the pool crashes (ESCALATE)
                self._fatal = asyncio.get_running_loop().create_task(
                    self.ref.tell(_AllReplicasDied(error=f"{type(error).__name__}: {error}")))
            return
        self._failovers[replica.index] = asyncio.get_running_loop().create_task(
            self._fail_over(replica), name=f"failover-{replica.name}")

    async def _settled(self) -> None:
        """Until every failover started so far has finished."""
        pending = [t for t in self._failovers.values() if not t.done()]
        if pending:
            await asyncio.wait(pending)

    def _least_busy(self, replicas: Sequence[_Replica]) -> _Replica:
        return min(replicas, key=lambda r: (r.load, r.requests, r.index))

    def _placement_order(self, exclude: Sequence[_Replica] = ()) -> list[_Replica]:
        """Usable replicas not in ``exclude``, best place for a new tenant first."""
        return sorted((r for r in self.replicas if r not in exclude and self._usable(r)),
                      key=lambda r: (len(r.tenants), r.load, r.index))

    def _record(self, tenant: str) -> _Tenant:
        record = self._tenants.get(tenant)
        if record is None:
            known = sorted(self._tenants) or "none"
            raise UnknownTenantError(f"tenant {tenant!r} has no adapter in the sampler (registered: {known})")
        return record

    def _no_replica_left(self) -> EngineDeadError:
        return EngineDeadError(f"the vLLM engine died; the sampler stops: all {len(self.replicas)} sampler "
                               "replicas of the pool died")

    async def _route(self, tenant: str | None) -> _Replica:
        """The replica for one request of ``tenant`` (waits for a publish's gate and for failovers)."""
        while True:
            if tenant is None:
                candidates = [r for r in self.replicas if self._usable(r)]
            else:
                record = self._record(tenant)
                while not record.open.is_set():  # an in-place publish fans out: wait for the new version
                    await record.open.wait()
                    record = self._record(tenant)  # it may have been removed meanwhile
                candidates = [r for r in record.replicas if self._usable(r)]
            if candidates:
                return self._least_busy(candidates)
            if any(not t.done() for t in self._failovers.values()):
                await self._settled()
                continue
            if not any(self._usable(r) for r in self.replicas):
                raise self._no_replica_left()
            raise UnknownTenantError(f"tenant {tenant!r} lost its replicas and could not be placed on another "
                                     "(see sampler.failover)")

    async def _ask(self, replica: _Replica, msg: Any, cost: int = 0) -> Any:
        """Ask one replica; a death found here is recorded (and raised)."""
        replica.load += cost
        replica.requests += 1
        try:
            return await replica.ref.ask(msg)
        except Exception as e:
            if is_replica_death(replica.ref, e):
                self._lost(replica, e)
            raise
        finally:
            replica.load -= cost
            replica.requests -= 1

    async def _fan_out(self, replicas: Sequence[_Replica], make: Any) -> tuple[dict[_Replica, Any],
                                                                               dict[_Replica, BaseException]]:
        """Ask each replica ``make(replica)`` concurrently; once sent, the asks run to their end even if the
        caller is cancelled (the records must match what the replicas hold). Returns (replies, errors);
        replicas that died are in neither."""
        asks = {r: asyncio.ensure_future(self._ask(r, make(r))) for r in replicas}
        done = asyncio.gather(*asks.values(), return_exceptions=True)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            raise
        replies, errors = {}, {}
        for replica, ask in asks.items():
            error = ask.exception()
            if error is None:
                replies[replica] = ask.result()
            elif not replica.dead:
                errors[replica] = error
        return replies, errors

    # ------------------------------------------------------------------ sampling

    @handler(concurrent=True)
    async def sample(self, msg: SampleRequest) -> SampleResult:
        cost = msg.sampling.n * msg.sampling.max_tokens
        replica = await self._route(msg.tenant)
        try:
            return await self._ask(replica, msg, cost)
        except Exception as e:
            if not replica.dead:
                raise  # a failed request (unknown tenant, prompt too long): the replica is fine
            first = e
        await self._settled()  # the tenant's adapter is on a survivor before the retry
        retry = await self._route(msg.tenant)
        self.log.warning(events.REQUEST_RETRIED, tenant=msg.tenant, from_replica=replica.name,
                         to_replica=retry.name, error=f"{type(first).__name__}: {first}")
        return await self._ask(retry, msg, cost)  # a second failure propagates

    # ------------------------------------------------------------------ adapters

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    async def _place(self, record: _Tenant, count: int, *, exclude: Sequence[_Replica] = ()) -> tuple[
            list[_Replica], float, BaseException | None]:
        """Register ``record``'s live version on up to ``count`` more replicas (best places first; a replica
        that dies meanwhile is replaced by the next). Returns (placed, longest load, first other error)."""
        placed: list[_Replica] = []
        duration, error = 0.0, None
        tried = list(exclude)
        while len(placed) < count:
            targets = self._placement_order(exclude=tried)[: count - len(placed)]
            if not targets:
                break
            tried += targets
            for replica in targets:  # reserved now, so that placements running meanwhile count it
                replica.tenants.add(record.name)
            msg = RegisterAdapter(tenant=record.name, path=record.path, version=record.version)
            replies, errors = await self._fan_out(targets, lambda r: msg)
            for replica in targets:
                if replica in replies and not replica.dead:  # (registered, then died: not a place)
                    placed.append(replica)
                    duration = max(duration, replies[replica].duration_s)
                elif not replica.dead:
                    replica.tenants.discard(record.name)
            if errors and error is None:
                error = next(iter(errors.values()))
                break
        return placed, duration, error

    def _add_replicas(self, record: _Tenant, replicas: Sequence[_Replica]) -> None:
        for replica in replicas:
            if replica not in record.replicas:
                record.replicas.append(replica)
            replica.tenants.add(record.name)

    @handler(concurrent=True)
    async def register(self, msg: RegisterAdapter) -> AdapterLoaded:
        async with self._lock(msg.tenant):
            if msg.tenant in self._tenants:
                raise DuplicateTenantError(f"tenant {msg.tenant!r} already has an adapter; use LoadAdapter to update it")
            record = _Tenant(msg.tenant, msg.version, msg.path)
            placed, duration, error = await self._place(record, self.replicas_per_tenant)
            if error is not None or not placed:
                for replica in placed:
                    replica.tenants.discard(msg.tenant)
                await self._fan_out(placed, lambda r: RemoveAdapter(tenant=msg.tenant))
                raise error if error is not None else self._no_replica_left()
            self._tenants[msg.tenant] = record
            self._add_replicas(record, placed)
        for replica in placed:
            self.log.info(events.REPLICA_PLACED, tenant=msg.tenant, version=msg.version, replica=replica.name,
                          replicas=self.placement(msg.tenant), tenants=len(replica.tenants))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=duration)

    @handler(concurrent=True)
    async def load(self, msg: LoadAdapter) -> AdapterLoaded:
        """Load ``msg.version`` on every replica of the tenant; it is live (and the reply comes) when all do."""
        async with self._lock(msg.tenant):
            record = self._record(msg.tenant)
            previous = LoadAdapter(tenant=msg.tenant, path=record.path, version=record.version,
                                   keep_serving=msg.keep_serving)
            if not msg.keep_serving:
                record.open.clear()
            try:
                replies, errors = await self._fan_out([r for r in record.replicas if self._usable(r)],
                                                      lambda r: msg)
                lost = [r for r in record.replicas if r.dead]
                record.replicas = [r for r in record.replicas if not r.dead]
                if errors:
                    await self._roll_back(record, list(replies), previous)
                    raise next(iter(errors.values()))
                record.version, record.path = msg.version, msg.path
                duration = max((reply.duration_s for reply in replies.values()), default=0.0)
                # replicas it had died meanwhile (their failover then skips it): place the new version instead
                await self._top_up(record, lost[0] if lost else None)
            finally:
                record.open.set()
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=duration)

    async def _top_up(self, record: _Tenant, dead: _Replica | None = None) -> None:
        """Place ``record``'s live version on more replicas until it has ``replicas_per_tenant`` (or all
        usable ones); EngineDeadError when none is left. ``dead``: the replica it lost (a failover)."""
        want = min(self.replicas_per_tenant, len(self._placement_order())) - len(record.replicas)
        placed, _, failed = await self._place(record, want, exclude=record.replicas) if want > 0 else ([], 0.0, None)
        self._add_replicas(record, placed)
        for replica in placed:
            self.log.warning(events.FAILOVER, tenant=record.name, version=record.version, to_replica=replica.name,
                             from_replica=dead.name if dead else None, error=dead.error if dead else None)
        if not record.replicas:
            if not self._placement_order():
                raise self._no_replica_left()
            self.log.error(events.FAILOVER, tenant=record.name, version=record.version, to_replica=None,
                           from_replica=dead.name if dead else None, error=f"not placed: {failed}")

    async def _roll_back(self, record: _Tenant, loaded: list[_Replica], previous: LoadAdapter) -> None:
        """A load failed on some replicas: those that took it serve the previous version again (or, if that
        fails too, no longer serve the tenant), so no replica serves a version that is not live."""
        if not loaded:
            return
        _, errors = await self._fan_out(loaded, lambda r: previous)
        for replica, error in errors.items():
            record.replicas.remove(replica)
            replica.tenants.discard(record.name)
            self.log.error(events.FAILOVER, tenant=record.name, version=previous.version, from_replica=replica.name,
                           to_replica=None, error=f"rollback failed: {type(error).__name__}: {error}")
            await self._fan_out([replica], lambda r: RemoveAdapter(tenant=record.name))

    @handler(concurrent=True)
    async def remove(self, msg: RemoveAdapter) -> None:
        """Unload the tenant from every replica (each lets its in-flight requests finish first)."""
        async with self._lock(msg.tenant):
            record = self._record(msg.tenant)
            record.open.clear()
            try:
                _, errors = await self._fan_out([r for r in record.replicas if self._usable(r)], lambda r: msg)
                if errors:
                    raise next(iter(errors.values()))
                del self._tenants[msg.tenant]
                for replica in record.replicas:
                    replica.tenants.discard(msg.tenant)
            finally:
                record.open.set()  # waiters wake up and find the tenant gone
        self._locks.pop(msg.tenant, None)

    # ------------------------------------------------------------------ failure

    async def _fail_over(self, dead: _Replica) -> None:
        """Move ``dead``'s tenants to survivors at their live versions (one at a time, under each one's lock)."""
        for name in sorted(dead.tenants):
            async with self._lock(name):
                record = self._tenants.get(name)
                if record is None or dead not in record.replicas:
                    continue  # removed, or a publish already moved it
                record.replicas.remove(dead)
                dead.tenants.discard(name)
                try:
                    await self._top_up(record, dead)
                except EngineDeadError:
                    return  # the last replica died meanwhile: the pool fails

    @handler
    async def _all_died(self, msg: _AllReplicasDied) -> None:
        raise EngineDeadError(f"the vLLM engine died; the sampler stops: {msg.error}")

    # ------------------------------------------------------------------ statistics

    @handler(concurrent=True)
    async def get_engine_stats(self, msg: GetEngineStats) -> EngineStatsSnapshot | None:
        """The replicas' counters summed (``replicas``: each live replica's own snapshot, in pool order)."""
        live = [r for r in self.replicas if self._usable(r)]
        replies, errors = await self._fan_out(live, lambda r: msg)
        if errors:
            raise next(iter(errors.values()))
        return combine_snapshots([replies[r] for r in live if r in replies])


async def start_sampler_pool(system: ActorSystem, replicas: Sequence[ActorRef], *, name: str = "sampler",
                             replicas_per_tenant: int = 1) -> ActorRef:
    """Start a SamplerPool over ``replicas`` (sampler refs, started under ``Supervision.ISOLATE``: local
    SamplerActors or proxies of remote ones) in ``system`` under ``name``; returns the pool's ref, which takes
    the sampler's messages."""
    return await system.start(SamplerPool(replicas, replicas_per_tenant=replicas_per_tenant), name=name,
                              supervision=Supervision.ESCALATE)



async def start_local_pool(system: ActorSystem, samplers: Sequence[Actor], *, name: str = "sampler",
                           replicas_per_tenant: int = 1) -> ActorRef:
    """Start ``samplers`` (SamplerActors, one per engine) as replicas ``<name>-0``, ``<name>-1``, ... under
    ISOLATE, and a SamplerPool over them under ``name``; returns the pool's ref."""
    replicas = [await system.start(s, name=f"{name}-{i}", supervision=Supervision.ISOLATE)
                for i, s in enumerate(samplers)]
    return await start_sampler_pool(system, replicas, name=name, replicas_per_tenant=replicas_per_tenant)
