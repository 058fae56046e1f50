"""The driver's side of Ray: join the cluster, place the hosts, and ``HostLink``, the handle of one host.

Everything that imports Ray is here (and imported only when ``RuntimeConfig.cluster`` is set).
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

from clora.cluster.host import ActorHost
from clora.config import ClusterConfig, PlacementConfig
from clora.errors import ConfigError

__all__ = ["HostLink", "connect", "spawn_host", "check_placements", "actor_died_errors"]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("cluster: the Ray backend needs Ray: pip install 'clora[cluster]' (ray==2.60.0)") from None
    return ray


def actor_died_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean: the Ray actor (its process or node) is gone."""
    return (_ray().exceptions.RayActorError,)


def connect(cluster: ClusterConfig) -> tuple[bool, dict[str, Any]]:
    """Join the cluster ``cluster.address`` names (or start one here for "local"); a process already
    connected to Ray keeps its connection. Returns (whether Ray was started by this call, what it has)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        # "local" forces a new instance: a bare ray.init() would join RAY_ADDRESS or a `ray start` cluster here
        ray.init(address=cluster.address, **options)
        started = True
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return started, {"nodes": len(nodes), "cpus": total.get("CPU", 0.0), "gpus": total.get("GPU", 0.0)}


def _request(placement: PlacementConfig) -> dict[str, float]:
    wanted = {"CPU": placement.num_cpus, "GPU": placement.num_gpus, **placement.resources}
    return {k: v for k, v in wanted.items() if v > 0}


def check_placements(cluster: ClusterConfig) -> None:
    """ConfigError when a placement fits no live node of the cluster (it would wait forever), or when all
    of them together exceed what the cluster has."""
    ray = _ray()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    wanted = [("trainer_placement", _request(cluster.trainer_placement))]
    wanted += [("sampler_placement", _request(cluster.sampler_placement))] * cluster.sampler_replicas
    for field, request in wanted[:2]:
        if not any(all(node.get(k, 0.0) >= v for k, v in request.items()) for node in nodes):
            have = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(n.items()) if not k.startswith("node:"))
                             for n in nodes) or "no live node"
            raise ConfigError(f"cluster.{field}: no node of the Ray cluster has {request} (nodes: {have})")
    total = ray.cluster_resources()
    for key in {k for _, r in wanted for k in r}:
        need = sum(r.get(key, 0.0) for _, r in wanted)
        if need > total.get(key, 0.0) + 1e-9:
            raise ConfigError(
                f"cluster: the trainer and {cluster.sampler_replicas} sampler replica(s) need {need:g} {key} in all, "
                f"the Ray cluster has {total.get(key, 0.0):g} (lower cluster.*_placement or sampler_replicas)")


@functools.cache
def _host_class() -> Any:
    ray = _ray()

    class RayActorHost(ActorHost):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, node_id=ray.get_runtime_context().get_node_id()[:12], **kwargs)

    RayActorHost.__name__ = RayActorHost.__qualname__ = "ClorActorHost"
    return ray.remote(RayActorHost)


def spawn_host(role: str, replica: int, placement: PlacementConfig, config: bytes, engine: Any = None) -> Any:
    """Create the Ray actor of one host (not started yet: ``HostLink.start``)."""
    return _host_class().options(
        num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, resources=dict(placement.resources) or None,
        max_restarts=0, max_task_retries=0, name=None,
    ).remote(role, config, replica, engine)


class HostLink:
    """One host's Ray actor handle, with the sequence numbers that keep its calls in mailbox order."""

    def __init__(self, handle: Any, role: str, replica: int) -> None:
        self.handle = handle
        self.role = role
        self.replica = replica
        self.placement: dict[str, Any] = {"role": role, "replica": replica}
        self._seq = itertools.count()

    async def start(self) -> dict[str, Any]:
        self.placement = await self.handle.start.remote()
        return self.placement

    def call(self, payload: Any, files: Any = None) -> tuple[int, Any]:
        """Submit a call now (its place in the actor's mailbox order is fixed here); ``(seq, object ref)``."""
        seq = next(self._seq)
        return seq, self.handle.call.remote(seq, payload, files)

    def cancel(self, seq: int) -> None:
        self.handle.cancel.remote(seq)

    def policy(self, tenant: str, priority: int | None, weight: float | None) -> None:
        """Mirror the driver's scheduling policy of ``tenant`` (None: removed), in call order."""
        self.handle.policy.remote(next(self._seq), tenant, priority, weight)

    def take_events(self, timeout_s: float) -> Any:
        return self.handle.take_events.remote(timeout_s)

    async def stop(self) -> list[bytes]:
        """Stop the actor there (drain); its remaining events."""
        return await self.handle.stop.remote()

    def kill(self) -> None:
        try:
            _ray().kill(self.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
