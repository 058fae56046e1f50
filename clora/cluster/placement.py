"""``start_remote_actors``: the sampler replica(s) and the trainer as Ray hosts, with their driver-side proxies.

What crosses and what is replicated (docs/scale-out.md):
- the scheduler: each host has its own ``Scheduler`` and decides its own resource there (the engine's LoRA
  slots, the trainer's device), as the shared one does locally per resource; the tenants' policies are the
  driver's, mirrored to every host in call order (``MirroredScheduler``); its decisions' events are logged
  where they are made and relayed;
- the engine: each sampler replica starts its own (or gets a copy of the ``engine`` object given, e.g. a
  FakeEngine); nothing of it is shared with the driver;
- the base model: every host resolves ``RuntimeConfig.model`` itself (same folder on each node, or built there).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgspec

from actors import ActorRef, ActorSystem, Supervision
from clora.cluster.link import HostLink, check_placements, connect, spawn_host
from clora.cluster.proxy import SamplerProxy, TrainerProxy
from clora.cluster.shipping import Shipments
from clora.config import ClusterConfig, RuntimeConfig
from clora.errors import ConfigError
from clora.sched import Scheduler, TenantPolicy

__all__ = ["RemoteActors", "MirroredScheduler", "connect_cluster", "start_remote_actors", "sampler_inbox"]


class MirroredScheduler(Scheduler):
    """The driver's scheduler: it keeps the tenants' policies and mirrors every change to the hosts."""

    def __init__(self, links: Sequence[HostLink], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.links = list(links)

    def set_policy(self, tenant: str, priority: int | None = None, weight: float | None = None) -> TenantPolicy:
        policy = super().set_policy(tenant, priority, weight)
        for link in self.links:
            link.policy(tenant, policy.priority, policy.weight)
        return policy

    def remove(self, tenant: str) -> None:
        super().remove(tenant)
        for link in self.links:
            link.policy(tenant, None, None)


@dataclass
class RemoteActors:
    sampler: ActorRef  # the sampler inbox the driver uses: the one replica's proxy, or the pool over them
    trainer: ActorRef
    scheduler: MirroredScheduler
    replicas: list[ActorRef] = field(default_factory=list)  # each sampler replica's proxy
    links: list[HostLink] = field(default_factory=list)


async def connect_cluster(cluster: ClusterConfig) -> tuple[Callable[[], None], dict[str, Any]]:
    """Join (or start) the Ray cluster: a closer that shuts Ray down if this call started it (call it after the
    actors stopped), and what the cluster has (``cluster.connected``'s fields)."""
    started_here, info = await asyncio.to_thread(connect, cluster)

    def close() -> None:
        if started_here:
            import ray

            ray.shutdown()

    return close, {"address": cluster.address, "started_here": started_here, **info}


async def start_remote_actors(config: RuntimeConfig, system: ActorSystem, *, engine: Any = None) -> RemoteActors:
    """Start the trainer and ``sampler_replicas`` sampler hosts where their placements say (Ray connected:
    ``connect_cluster``), and register their proxies in ``system`` as "trainer" and "sampler" (replicas:
    "sampler-<i>" behind the pool)."""
    cluster = config.cluster
    assert cluster is not None
    await asyncio.to_thread(check_placements, cluster)
    payload = msgspec.json.encode(config)
    links = [HostLink(spawn_host("trainer", 0, cluster.trainer_placement, payload), "trainer", 0)]
    links += [HostLink(spawn_host("sampler", i, cluster.sampler_placement, payload, engine), "sampler", i)
              for i in range(cluster.sampler_replicas)]
    try:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(link.start() for link in links)), cluster.start_timeout_s)
        except TimeoutError:
            raise ConfigError(
                f"cluster.start_timeout_s: the trainer and sampler hosts did not start within {cluster.start_timeout_s:g} s "
                f"(is the cluster busy? {round(time.perf_counter() - started, 1)} s waited)") from None
        shipments = Shipments()
        trainer = await system.start(TrainerProxy(links[0]), name="trainer", supervision=Supervision.ESCALATE,
                                     mailbox_size=config.trainer.queue_size)
        single = cluster.sampler_replicas == 1
        replicas = [
            await system.start(SamplerProxy(link, shipments=shipments), name="sampler" if single else f"sampler-{i}",
                               supervision=Supervision.ESCALATE if single else Supervision.ISOLATE)
            for i, link in enumerate(links[1:])
        ]
        sampler = await sampler_inbox(system, replicas, replicas_per_tenant=cluster.replicas_per_tenant)
    except BaseException:
        for link in links:
            link.kill()
        raise
    scheduler = MirroredScheduler(links, aging_s=config.scheduler.aging_s,
                                  wait_bound_s=config.scheduler.wait_bound_s,
                                  yield_to_higher=config.scheduler.yield_to_higher,
                                  linger_s=config.scheduler.linger_s, log=system.log)
    return RemoteActors(sampler=sampler, trainer=trainer, scheduler=scheduler, replicas=replicas, links=links)


async def sampler_inbox(system: ActorSystem, replicas: list[ActorRef], *, replicas_per_tenant: int = 1) -> ActorRef:
    """THE place where R sampler replicas become one sampler inbox: the one replica itself, or
    ``clora.cluster.pool``'s SamplerPool over them (placement on ``replicas_per_tenant`` replicas each,
    routing, publish to every replica, failover)."""
    if len(replicas) == 1:
        return replicas[0]
    from clora.cluster.pool import start_sampler_pool

    return await start_sampler_pool(system, replicas, name="sampler", replicas_per_tenant=replicas_per_tenant)
