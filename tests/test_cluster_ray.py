"""The sampler and the trainer in Ray actors on a local Ray cluster (marker ``ray``; ``make test-all``).

FakeEngine samplers and the tiny model's trainer: a proxy keeps ask / tell / cancel / mailbox meaning; a remote
trainer step equals a local one bit for bit; killing the sampler's Ray actor is the same fatal crash as a local
engine death; and a Runtime with ``[cluster]`` relays the remote actors' events into events.jsonl with placement
fields. The real-vLLM run: tests/test_cluster_vllm.py.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from actors import ActorCrashed, ActorStopped, ActorSystem, Supervision
from clora import events as names
from clora.config import (
    ClusterConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig, PlacementConfig, RuntimeConfig, TrainerConfig,
)
from clora.errors import EngineDeadError, UnknownTenantError
from clora.events import JsonlSink, read_events, run_logger
from clora.messages import (
    AddTenant, Completion, GetEngineStats, RegisterAdapter, SampleRequest, SamplingSpec, TrainStep,
)
from clora.testing import until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

HALF = PlacementConfig(num_cpus=0.5)  # 2 CPUs in the test cluster: trainer + sampler(s) fit
SLOW_PROMPT = [9, 9, 9]  # the scripted engine below decodes this one for 60 s


def _script():
    """A FakeEngine script (a closure: Ray copies it to the host by value)."""
    done = Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0], text="56", finish_reason="stop")

    async def reply(request):
        if request.prompt_token_ids == SLOW_PROMPT:
            await asyncio.sleep(60)
        return done

    return reply


def _config(model_dir, run_dir=None, **cluster) -> RuntimeConfig:
    return RuntimeConfig(
        model=ModelConfig(source=str(model_dir)), trainer=TrainerConfig(num_threads=1),
        run_dir=str(run_dir or "unused"),
        cluster=ClusterConfig(address="auto", sampler_placement=HALF, trainer_placement=HALF, **cluster),
    )


async def _host(role, config, engine=None):
    from clora.cluster.link import HostLink, spawn_host

    placement = config.cluster.trainer_placement if role == "trainer" else config.cluster.sampler_placement
    link = HostLink(spawn_host(role, 0, placement, msgspec.json.encode(config), engine), role, 0)
    await link.start()
    return link


def _events(path):
    return list(read_events(path)) if path.exists() else []


async def test_a_remote_sampler_proxy_keeps_ask_tell_cancel_and_mailbox_meaning(ray_cluster, tiny_model_dir,
                                                                              tiny_adapters, tmp_path):
    from clora.cluster.proxy import SamplerProxy
    from clora.cluster.shipping import Shipments
    from clora.sampler.actor import SamplerActor
    from clora.testing import FakeEngine

    log_path = tmp_path / "events.jsonl"
    sink = JsonlSink(log_path)
    link = await _host("sampler", _config(tiny_model_dir), FakeEngine(_script()))
    async with ActorSystem("driver", logger=run_logger(sink, "critical")) as system:
        ref = await system.start(SamplerProxy(link, shipments=Shipments()), name="sampler",
                                 supervision=Supervision.ISOLATE)
        assert ref.stats.capacity == SamplerActor.mailbox_size and ref.accepts(SampleRequest)
        # ask: the reply, and the handler's error as the same type (the actor goes on)
        await ref.ask(GetEngineStats())
        loaded = await ref.ask(RegisterAdapter(tenant="a", path=str(tiny_adapters["a1"]), version=0))
        assert (loaded.tenant, loaded.version) == ("a", 0)
        result = await ref.ask(SampleRequest(tenant="a", prompt_token_ids=[1, 2], sampling=SamplingSpec(n=2)))
        assert result.adapter_version == 0 and [c.token_ids for c in result.completions] == [[5, 6], [5, 6]]
        with pytest.raises(UnknownTenantError):
            await ref.ask(SampleRequest(tenant="nobody", prompt_token_ids=[1]))
        assert ref.alive
        # cancel: the remote call is withdrawn where the actor runs
        slow = asyncio.ensure_future(ref.ask(SampleRequest(tenant=None, prompt_token_ids=SLOW_PROMPT)))
        await asyncio.sleep(1.0)
        slow.cancel()
        await until(lambda: any(e["event"] == names.CLUSTER_CALL_CANCELLED for e in _events(log_path)), timeout=30)
        assert (await ref.ask(SampleRequest(tenant=None, prompt_token_ids=[3]))).adapter_version == -1
        # tell: a handler's error crashes the proxy, as it crashes a local actor; later asks fail clearly
        await ref.tell(SampleRequest(tenant="nobody", prompt_token_ids=[1]))
        await until(lambda: not ref.alive, timeout=30)
        assert isinstance(ref.failure, UnknownTenantError)
        with pytest.raises(ActorStopped):
            await ref.ask(GetEngineStats())
    sink.close()
    got = _events(log_path)
    cancelled = [e for e in got if e["event"] == names.CLUSTER_CALL_CANCELLED]
    assert cancelled[0]["message"] == "SampleRequest" and cancelled[0]["pid"] != os.getpid()
    registered = [e for e in got if e["event"] == names.ADAPTER_REGISTERED]
    assert registered and registered[0]["role"] == "sampler" and registered[0]["replica"] == 0
    shipped = [e for e in got if e["event"] == names.CLUSTER_ADAPTER_SHIPPED]
    assert shipped[0]["size_bytes"] == sum(f.stat().st_size for f in tiny_adapters["a1"].iterdir())


async def test_a_remote_trainer_step_equals_the_local_one_bit_for_bit(ray_cluster, tiny_model_dir):
    import torch

    from clora.cluster.proxy import TrainerProxy
    from clora.testing import make_data
    from clora.trainer.actor import TrainerActor

    config = _config(tiny_model_dir)
    link = await _host("trainer", config)
    add = AddTenant(tenant="t", lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2))
    step = TrainStep(tenant="t", data=make_data(4, seed=1), loss=LossConfig(kind="ppo"), copy_adapter=True)
    async with ActorSystem("driver") as system:
        local = await TrainerActor.start_in(system, tiny_model_dir, config.trainer, name="local")
        remote = await system.start(TrainerProxy(link), name="trainer", mailbox_size=config.trainer.queue_size)
        results = []
        for ref in (local, remote):
            assert await ref.ask(add) == 0
            results.append([await ref.ask(step), await ref.ask(step)])
    for mine, theirs in zip(*results):
        untimed = [{k: v for k, v in r.metrics.values.items() if not k.startswith("time/")} for r in (mine, theirs)]
        assert untimed[0] == untimed[1] and mine.metrics.version == theirs.metrics.version
        assert mine.adapter.tensors.keys() == theirs.adapter.tensors.keys()
        for key, tensor in mine.adapter.tensors.items():
            assert torch.equal(tensor, theirs.adapter.tensors[key]), key


def _sampler_crash_events(path):
    got = [e for e in read_events(path) if e.get("actor") == "sampler" and "pid" not in e]  # the driver's own
    return {(e["event"], e.get("action")) for e in got if e["event"] in (names.ACTOR_FAILED, names.ENGINE_DIED)}


async def test_killing_the_ray_actor_of_the_sampler_is_the_same_fatal_crash_as_a_local_engine_death(
        ray_cluster, tiny_model_dir, tmp_path):
    from clora.cluster.proxy import SamplerProxy
    from clora.sampler.actor import SamplerActor
    from clora.testing import FakeEngine

    config = _config(tiny_model_dir)
    outcomes = {}
    for where in ("local", "remote"):
        path = tmp_path / f"{where}.jsonl"
        sink = JsonlSink(path)
        engine = FakeEngine(_script())
        with pytest.raises(ActorCrashed) as crash:
            async with ActorSystem("driver", logger=run_logger(sink, "critical")) as system:
                if where == "local":
                    ref = await system.start(SamplerActor(tiny_model_dir, config.model, config.engine,
                                                          shared_engine=engine), name="sampler")
                    slow = asyncio.ensure_future(ref.ask(SampleRequest(tenant=None, prompt_token_ids=[1])))
                    engine.kill("killed by the test")
                else:
                    link = await _host("sampler", config, engine)
                    ref = await system.start(SamplerProxy(link), name="sampler")
                    slow = asyncio.ensure_future(ref.ask(SampleRequest(tenant=None, prompt_token_ids=SLOW_PROMPT)))
                    await asyncio.sleep(1.0)
                    ray_cluster.kill(link.handle, no_restart=True)
                with pytest.raises((EngineDeadError, ActorCrashed, ActorStopped)):
                    await slow  # the asker of an in-flight request learns it too
                await asyncio.sleep(120)  # the crash escalates and ends the system long before
        sink.close()
        assert crash.value.actor == "sampler" and isinstance(crash.value.cause, EngineDeadError)
        outcomes[where] = _sampler_crash_events(path)
    assert outcomes["remote"] == outcomes["local"] == {(names.ACTOR_FAILED, "escalate"), (names.ENGINE_DIED, None)}
    remote = list(read_events(tmp_path / "remote.jsonl"))
    assert [e["role"] for e in remote if e["event"] == names.CLUSTER_HOST_DIED] == ["sampler"]


async def test_a_runtime_with_a_cluster_runs_a_tenant_and_relays_the_remote_events(ray_cluster, tiny_model_dir,
                                                                                  tmp_path):
    import clora.runtime
    from clora.rl.rollout import completion_datum
    from clora.testing import FakeEngine

    run = tmp_path / "run"
    config = _config(tiny_model_dir, run)
    versions = []
    async with clora.runtime.Runtime(config, console_level="critical", engine=FakeEngine(_script())) as rt:
        tenant = await rt.tenant("t", lora=LoraConfig(rank=4, alpha=8.0), priority=1)
        for _ in range(2):
            group = await tenant.sample([5, 6, 7], n=2, max_tokens=4)
            versions.append(group.adapter_version)
            data = [completion_datum(group.prompt_token_ids, c, advantage=a)
                    for c, a in zip(group.completions, (1.0, -1.0))]
            await tenant.forward_backward(data, LossConfig(kind="importance_sampling"))
            await tenant.optim_step()
            await tenant.publish()
        versions.append((await tenant.sample([5], n=1, max_tokens=2)).adapter_version)
        await tenant.close()
    assert versions == [0, 1, 2]  # each sample used the version published before it
    got = list(read_events(run))
    remote = [e for e in got if "pid" in e]
    assert {e["pid"] for e in remote} and os.getpid() not in {e["pid"] for e in remote}
    by_role = {e["role"] for e in remote}
    assert by_role == {"sampler", "trainer"} and all("node_id" in e and e["replica"] == 0 for e in remote)
    seen = {e["event"] for e in remote}
    assert {names.TRAINER_STEP, names.SAMPLE_DONE, names.ADAPTER_LOADED, names.CLUSTER_ADAPTER_RECEIVED} <= seen
    assert [e["version"] for e in got if e["event"] == names.CLUSTER_ADAPTER_SHIPPED] == [0, 1, 2]
    started = [e for e in got if e["event"] == names.CLUSTER_HOST_STARTED]
    assert sorted(e["role"] for e in started) == ["sampler", "trainer"]


async def test_two_remote_sampler_replicas_serve_tenants_through_the_pool_with_one_put_per_version(
        ray_cluster, tiny_model_dir, tmp_path):
    import clora.runtime
    from clora.testing import FakeEngine

    run = tmp_path / "run"
    config = _config(tiny_model_dir, run, sampler_replicas=2)
    async with clora.runtime.Runtime(config, console_level="critical", engine=FakeEngine(_script())) as rt:
        assert sorted(n for n in rt._system.actors if n.startswith("sampler")) == ["sampler", "sampler-0", "sampler-1"]
        tenants = [await rt.tenant(f"t{i}", lora=LoraConfig(rank=4, alpha=8.0)) for i in range(2)]
        for tenant in tenants:
            assert (await tenant.sample([5, 6], n=2, max_tokens=2)).adapter_version == 0
    got = list(read_events(run))
    sampled = {e["replica"] for e in got if e["event"] == names.SAMPLE_DONE}
    assert sampled == {0, 1}  # the pool placed the two tenants on different replicas
    assert sorted(e["version"] for e in got if e["event"] == names.CLUSTER_ADAPTER_SHIPPED) == [0, 0]  # one per tenant
