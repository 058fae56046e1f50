"""``clora bench cluster``: what the Ray placement layer costs, on a local Ray cluster (docs/scale-out.md).

Two tables, each local (the actor in this process) next to remote (the actor in a Ray actor, reached through its
driver-side proxy), with a FakeEngine sampler so that only the layer is measured, not vLLM:
- ask round trip: sequential asks of GetEngineStats (a no-op handler) and of a base-model SampleRequest
  (an 8-token prompt, one 2-token completion), p50 / p90 / mean per ask;
- publish: a new adapter version (a PEFT folder in /dev/shm, as SyncActor writes it) loaded by 1..R sampler
  replicas at once (LoadAdapter to each proxy: one ``ray.put``, fetched and written by each host), the time
  until every replica answered, and the bytes shipped per publish.
On one machine Ray's object store is shared memory: these figures are the layer's overhead, not a network's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

__all__ = ["main"]


def _drop(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """The benchmark prints a table, not the actors' events."""
    raise structlog.DropEvent


def _stats(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return (statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))], statistics.fmean(ordered))


async def _round_trips(ref: Any, asks: int) -> dict[str, tuple[float, float, float]]:
    from clora.messages import GetEngineStats, SampleRequest, SamplingSpec

    out = {}
    for label, message in (("GetEngineStats", GetEngineStats()),
                           ("SampleRequest", SampleRequest(tenant=None, prompt_token_ids=list(range(8)),
                                                           sampling=SamplingSpec(max_tokens=2)))):
        for _ in range(5):  # warm up
            await ref.ask(message)
        samples = []
        for _ in range(asks):
            started = time.perf_counter()
            await ref.ask(message)
            samples.append(time.perf_counter() - started)
        out[label] = _stats(samples)
    return out


async def _publishes(refs: list[Any], adapters: list[Path], root: Path) -> tuple[list[float], int]:
    """Register version 0 on every replica, then load each further version on all of them at once."""
    import shutil

    from clora.messages import LoadAdapter, RegisterAdapter

    def publish_dir(version: int) -> Path:
        path = root / "t" / f"v{version}"
        shutil.copytree(adapters[version % len(adapters)], path)
        return path

    first = publish_dir(0)
    await asyncio.gather(*(ref.ask(RegisterAdapter(tenant="t", path=str(first), version=0)) for ref in refs))
    samples = []
    for version in range(1, len(adapters) * 3 + 1):
        path = publish_dir(version)
        started = time.perf_counter()
        await asyncio.gather(*(ref.ask(LoadAdapter(tenant="t", path=str(path), version=version)) for ref in refs))
        samples.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in first.iterdir())
    return samples, size


async def _run(args: argparse.Namespace) -> None:
    import ray

    from actors import ActorSystem
    from clora.cluster.link import HostLink, spawn_host
    from clora.cluster.proxy import SamplerProxy
    from clora.cluster.shipping import Shipments
    from clora.config import ClusterConfig, ModelConfig, PlacementConfig, RuntimeConfig
    from clora.messages import Completion
    from clora.models import random_lora_adapter, resolve_model
    from clora.sampler.actor import SamplerActor
    from clora.testing import FakeEngine

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="clora-bench-cluster-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    model = ModelConfig(source=args.model)
    model_dir = resolve_model(model)
    adapters = [random_lora_adapter(model_dir, work / f"a{i}", rank=args.rank, seed=i) for i in range(2)]
    reply = Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0], text="56", finish_reason="stop")
    placement = PlacementConfig(num_cpus=min(1.0, args.cpus / (args.replicas + 1)))
    config = RuntimeConfig(model=model, cluster=ClusterConfig(address="local", sampler_replicas=args.replicas,
                                                              sampler_placement=placement))
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    try:
        links = [HostLink(spawn_host("sampler", i, placement, msgspec.json.encode(config), FakeEngine([reply])),
                          "sampler", i) for i in range(args.replicas)]
        await asyncio.gather(*(link.start() for link in links))
        shipments = Shipments()
        async with ActorSystem("bench", logger=structlog.wrap_logger(None, processors=[_drop])) as system:
            local = await system.start(SamplerActor(model_dir, model, config.engine,
                                                    shared_engine=FakeEngine([reply])), name="local")
            remote = [await system.start(SamplerProxy(link, shipments=shipments), name=f"sampler:{i}")
                      for i, link in enumerate(links)]
            trips = {"local": await _round_trips(local, args.asks), "remote": await _round_trips(remote[0], args.asks)}
            publishes = {"local (1 engine)": await _publishes([local], adapters, work / "local")}
            for r in range(1, args.replicas + 1):
                # a fresh tenant per replica count: its register happens on r replicas
                pubs = await _publishes(remote[:r], adapters, work / f"remote{r}")
                publishes[f"remote x{r}"] = pubs
                for ref in remote[:r]:
                    from clora.messages import RemoveAdapter

                    await ref.ask(RemoveAdapter(tenant="t"))
                shipments.forget("t")
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    print(f"clora bench cluster: model {args.model}, adapter rank {args.rank}, {args.asks} asks each, "
          f"local Ray cluster ({args.cpus} CPUs, started in {ray_start:.1f} s), FakeEngine samplers")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)\n")
    print(f"{'ask round trip':<28}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}")
    for where, rows in trips.items():
        for label, (p50, p90, mean) in rows.items():
            print(f"{where + ' ' + label:<28}{p50 * 1e3:>10.3f}{p90 * 1e3:>10.3f}{mean * 1e3:>10.3f}")
    print(f"\n{'publish (all replicas)':<28}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}{'bytes':>12}")
    for where, (samples, size) in publishes.items():
        p50, p90, mean = _stats(samples)
        print(f"{where:<28}{p50 * 1e3:>10.2f}{p90 * 1e3:>10.2f}{mean * 1e3:>10.2f}{size:>12,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clora bench cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="base model whose adapters are published ('tiny', 'smollm2', a dir)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the published adapter (all linear layers)")
    parser.add_argument("--replicas", type=int, default=2, help="remote sampler replicas (publish fan-out 1..R)")
    parser.add_argument("--asks", type=int, default=200, help="asks per round-trip measurement")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
