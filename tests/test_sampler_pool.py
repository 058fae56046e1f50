"""SamplerPool on FakeEngines: placement and affinity, publishing to every replica, pinned versions, failover,
the last replica's death, engine statistics (docs/sampler-pool.md)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from actors import ActorCrashed, ActorSystem
from clora import events
from clora.cluster.pool import SamplerPool, start_local_pool
from clora.config import EngineConfig, ModelConfig
from clora.continual.serving import serving_key
from clora.errors import EngineDeadError, PromptTooLongError, UnknownTenantError
from clora.messages import (
    Completion,
    GetEngineStats,
    LoadAdapter,
    RegisterAdapter,
    RemoveAdapter,
    SampleRequest,
    SamplingSpec,
)
from clora.sampler.actor import SamplerActor
from clora.sampler.engine_stats import EngineStats
from clora.testing import FakeEngine, FakeRequest, capture_events

pytestmark = pytest.mark.timeout(60)

FREE = 100  # prompts starting with a token >= FREE finish at once; lower ones wait for Gate.release[token]


class Gate:
    """FakeEngines whose requests (first prompt token < FREE) finish when the test releases them; a completion's
    text names the engine and the adapter that served it, e.g. ``"1:t#2@v0"``."""

    def __init__(self, replicas: int) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.started: dict[int, asyncio.Event] = {}
        self.engines = [FakeEngine(self._answer(i), max_model_len=64, read_adapters=False) for i in range(replicas)]

    def _answer(self, index: int):
        async def answer(request: FakeRequest) -> Completion:
            engine = self.engines[index]
            served = "base" if request.lora_id is None else engine.serving[request.lora_id].name
            key = request.prompt_token_ids[0]
            self.started.setdefault(key, asyncio.Event()).set()
            if key < FREE:
                await self.release.setdefault(key, asyncio.Event()).wait()
            return Completion(token_ids=[1], logprobs=[0.0], text=f"{index}:{served}", finish_reason="length")
        return answer

    def free(self, key: int) -> None:
        self.release.setdefault(key, asyncio.Event()).set()

    def tenants(self, index: int) -> set[str | None]:
        return {r.tenant for r in self.engines[index].requests}


@contextlib.asynccontextmanager
async def pool_of(gate: Gate, *, per_tenant: int = 1):
    samplers = [SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=e)
                for e in gate.engines]
    async with ActorSystem("pool") as system:
        ref = await start_local_pool(system, samplers, replicas_per_tenant=per_tenant)
        yield ref, ref._cell._actor


def ask(ref, tenant, key: int):
    return asyncio.ensure_future(ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[key],
                                                       sampling=SamplingSpec(max_tokens=4))))


async def register(ref, tenant, version=0):
    await ref.ask(RegisterAdapter(tenant=tenant, path=f"{tenant}-v{version}", version=version))


async def test_tenants_go_to_the_least_loaded_replica_and_stay_on_it():
    gate = Gate(2)
    async with pool_of(gate) as (ref, pool):
        for tenant in "abc":
            await register(ref, tenant)
        # fewest tenants first (ties: the lower index): a -> 0, b -> 1, c -> 0
        assert [pool.placement(t) for t in "abc"] == [["sampler-0"], ["sampler-1"], ["sampler-0"]]
        results = await asyncio.gather(*(ask(ref, t, FREE + i) for i, t in enumerate("abcabc")))
        assert gate.tenants(0) == {"a", "c"} and gate.tenants(1) == {"b"}  # affinity
        assert [r.completions[0].text[0] for r in results] == list("010010")
        with pytest.raises(PromptTooLongError):  # a bad request fails alone: no retry, no failover
            await ref.ask(SampleRequest(tenant="a", prompt_token_ids=[FREE] * 70))
        with pytest.raises(UnknownTenantError, match="'ghost'.*registered: \\['a', 'b', 'c'\\]"):
            await ask(ref, "ghost", FREE)
        assert pool.alive() == ["sampler-0", "sampler-1"]


async def test_tenants_registered_at_once_spread_over_the_replicas():
    gate = Gate(2)
    gate.engines[0].load_s = gate.engines[1].load_s = 0.05  # the registrations overlap
    async with pool_of(gate) as (ref, pool):
        await asyncio.gather(*(register(ref, t) for t in "abcd"))
        assert sorted(len([t for t in "abcd" if pool.placement(t) == [r]]) for r in pool.alive()) == [2, 2]


async def test_requests_of_a_tenant_on_two_replicas_go_to_the_less_busy_one():
    gate = Gate(2)
    async with pool_of(gate, per_tenant=2) as (ref, pool):
        await register(ref, "t")
        assert pool.placement("t") == ["sampler-0", "sampler-1"]
        big = ref.ask(SampleRequest(tenant="t", prompt_token_ids=[1], sampling=SamplingSpec(n=4, max_tokens=4)))
        held = [asyncio.ensure_future(big)]  # replica 0: 16 tokens to decode
        await gate.started.setdefault(1, asyncio.Event()).wait()
        held.append(ask(ref, "t", 2))  # replica 1: 4 tokens
        await gate.started.setdefault(2, asyncio.Event()).wait()
        # one request in flight on each, but replica 1 has less decode work left: the next ones go there
        assert (await ask(ref, "t", FREE)).completions[0].text.startswith("1:")
        assert (await ask(ref, None, FREE + 1)).completions[0].text == "1:base"
        for key in (1, 2):
            gate.free(key)
        assert [(await h).completions[0].text[0] for h in held] == ["0", "1"]


@pytest.mark.parametrize("keep_serving", [False, True])
async def test_a_publish_reaches_every_replica_before_its_reply_and_no_result_mixes_versions(keep_serving):
    gate = Gate(2)
    gate.engines[1].load_s = 0.2  # the slow replica: the reply must wait for it
    async with pool_of(gate, per_tenant=2) as (ref, pool):
        await register(ref, "t")
        old = [ask(ref, "t", 1), ask(ref, "t", 2)]
        for key in (1, 2):
            await gate.started.setdefault(key, asyncio.Event()).wait()
        assert gate.tenants(0) == gate.tenants(1) == {"t"}  # one on each replica
        load = asyncio.ensure_future(ref.ask(LoadAdapter(tenant="t", path="t-v1", version=1,
                                                         keep_serving=keep_serving)))
        await asyncio.sleep(0.05)
        during = [ask(ref, "t", FREE), ask(ref, "t", FREE + 1)]  # sent while the publish fans out
        await asyncio.sleep(0.05)
        assert not load.done()
        gate.free(1)
        gate.free(2)
        assert (await load).version == 1
        # at the reply, every replica serves version 1 (and the pool calls it live)
        for engine in gate.engines:
            assert [a.version for a in engine.serving.values() if a.tenant == "t"][-1] == 1
        assert pool.serving_version("t") == 1
        after = [await ask(ref, "t", FREE + 2 + i) for i in range(2)]
        assert [r.adapter_version for r in after] == [1, 1]
        assert [(await h).adapter_version for h in old] == [0, 0]
        for result in [*(await asyncio.gather(*during)), *after]:
            assert result.completions[0].text.endswith(f"@v{result.adapter_version}")  # one version, the named one
        if not keep_serving:  # the pool held them while the in-place load fanned out
            assert [(await h).adapter_version for h in during] == [1, 1]
    assert gate.engines[0].mixed == [] and gate.engines[1].mixed == []


async def test_a_failed_publish_is_rolled_back_on_the_replicas_that_took_it():
    gate = Gate(2)
    gate.engines[1].refuse_load("t", 1)
    async with pool_of(gate, per_tenant=2) as (ref, pool):
        await register(ref, "t")
        with pytest.raises(Exception, match="refused"):
            await ref.ask(LoadAdapter(tenant="t", path="t-v1", version=1))
        assert pool.serving_version("t") == 0
        assert [a.version for a in gate.engines[0].loaded("t")] == [0, 1, 0]  # went back to the live version
        assert {(await ask(ref, "t", FREE + i)).adapter_version for i in range(4)} == {0}


async def test_pinned_versions_go_only_to_the_replicas_that_hold_them():
    gate = Gate(2)
    async with pool_of(gate) as (ref, pool):
        await register(ref, "t", version=3)
        pinned = serving_key("t", 2)
        await register(ref, pinned, version=2)
        assert pool.placement("t") == ["sampler-0"] and pool.placement(pinned) == ["sampler-1"]
        busy = ask(ref, pinned, 1)  # replica 1 is now the busier one
        await gate.started.setdefault(1, asyncio.Event()).wait()
        results = await asyncio.gather(*(ask(ref, pinned, FREE + i) for i in range(3)))
        assert {r.adapter_version for r in results} == {2}
        assert {r.completions[0].text for r in results} == {f"1:{pinned}#2@v2"}
        assert gate.tenants(0) == set()  # nothing pinned went to the replica without that version
        gate.free(1)
        await busy


async def test_a_dead_replicas_tenants_fail_over_at_their_live_version_and_in_flight_requests_retry_once():
    gate = Gate(2)
    with capture_events() as logged:
        async with pool_of(gate) as (ref, pool):
            await register(ref, "a")
            await register(ref, "b")
            await ref.ask(LoadAdapter(tenant="a", path="a-v1", version=1))
            in_flight = ask(ref, "a", 1)
            await gate.started.setdefault(1, asyncio.Event()).wait()
            gate.engines[0].kill("test")
            gate.free(1)  # the request ends in the dead engine: EngineDeadError, then the retry on replica 1
            result = await in_flight
            assert (result.adapter_version, result.completions[0].text) == (1, "1:a#3@v1")
            assert pool.placement("a") == ["sampler-1"] and pool.alive() == ["sampler-1"]
            assert [(x.tenant, x.version, x.path) for x in gate.engines[1].loaded("a")] == [("a", 1, Path("a-v1"))]
            assert (await ask(ref, "a", FREE)).completions[0].text == "1:a#3@v1"
            assert (await ask(ref, "b", FREE)).completions[0].text == "1:b#2@v0"
    [failed] = logged.named(events.REPLICA_FAILED)
    assert failed["replica"] == "sampler-0" and failed["tenants"] == ["a"] and failed["alive"] == ["sampler-1"]
    [moved] = logged.named(events.FAILOVER)
    assert (moved["tenant"], moved["version"], moved["from_replica"], moved["to_replica"]) == (
        "a", 1, "sampler-0", "sampler-1")
    [retried] = logged.named(events.REQUEST_RETRIED)
    assert (retried["tenant"], retried["from_replica"], retried["to_replica"]) == ("a", "sampler-0", "sampler-1")
    assert "EngineDeadError" in retried["error"]


async def test_a_second_failure_of_a_retried_request_propagates():
    gate = Gate(3)

    def killing(index: int):  # this engine dies under the first request of tenant "a" it gets
        answer = gate._answer(index)

        async def script(request: FakeRequest) -> Completion:
            if request.tenant == "a":
                gate.engines[index].kill(f"engine {index} killed by a's request")
            return await answer(request)
        return script

    for i in (0, 1):  # a is placed on replica 0, fails over to 1, then to 2
        gate.engines[i].script = killing(i)
    with capture_events() as logged:
        async with pool_of(gate) as (ref, pool):
            await register(ref, "a")
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await ask(ref, "a", FREE)
            assert len(logged.named(events.REQUEST_RETRIED)) == 1  # once only
            assert pool.alive() == ["sampler-2"] and (await ask(ref, "a", FREE)).completions[0].text == "2:a#2@v0"


async def test_the_last_replicas_death_fails_the_pool_as_a_single_sampler_fails():
    gate = Gate(2)
    with pytest.raises(ActorCrashed) as crashed:
        async with pool_of(gate) as (ref, pool):
            await register(ref, "a")
            for engine in gate.engines:
                engine.kill("test")
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await ask(ref, "a", FREE)
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await ask(ref, None, FREE)
            await asyncio.sleep(1)  # the crash cancels this body
    assert crashed.value.actor == "sampler" and isinstance(crashed.value.cause, EngineDeadError)
    assert "sampler stops" in str(crashed.value)


async def test_engine_stats_sum_the_replicas_and_keep_each_one():
    gate = Gate(2)
    for i, engine in enumerate(gate.engines):
        engine.stats = EngineStats()
    async with pool_of(gate) as (ref, pool):
        for i, engine in enumerate(gate.engines):
            engine.stats.observe_outputs(prompt_tokens=10 * (i + 1), computed=10, cached=10 * i, generated=i)
        stats = await ref.ask(GetEngineStats())
        await register(ref, "a")
        await ref.ask(RemoveAdapter(tenant="a"))
        with pytest.raises(UnknownTenantError):
            await ask(ref, "a", FREE)
    assert (stats.prompt_tokens, stats.prompt_tokens_cached, stats.generation_tokens) == (30, 10, 1)
    assert [s.prompt_tokens for s in stats.replicas] == [10, 20]
    assert isinstance(pool, SamplerPool)
