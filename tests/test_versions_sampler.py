"""Several versions of one tenant's adapter serving at once (LoadAdapter.keep_serving).

On the FakeEngine, which tracks what each LoRA id holds while a request decodes (``mixed``) and
what it unloaded (``removed``): a publish that lands mid-generation never gates the tenant, never
mixes versions in a sequence, and the old version is unloaded exactly when its last request ends.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from actors import ActorSystem, Supervision
from clora import events as names
from clora.config import EngineConfig, ModelConfig
from clora.messages import Completion, LoadAdapter, RegisterAdapter, RemoveAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.testing import FakeEngine, FakeRequest, until

pytestmark = pytest.mark.timeout(60)


class Held:
    """Requests decode until the test releases their prompt's first token; the completion's text is
    the adapter name the request's LoRA id held when it started."""

    def __init__(self) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.engine = FakeEngine(self.answer, max_model_len=64, max_lora_rank=16, read_adapters=False)

    async def answer(self, request: FakeRequest) -> Completion:
        held = self.engine.serving[request.lora_id].name
        await self.release.setdefault(request.prompt_token_ids[0], asyncio.Event()).wait()
        return Completion(token_ids=[1], logprobs=[0.0], text=held, finish_reason="length")

    def free(self, key: int) -> None:
        self.release.setdefault(key, asyncio.Event()).set()


def _sampler(engine: FakeEngine, max_loras: int = 8) -> SamplerActor:
    return SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(max_loras=max_loras),
                        shared_engine=engine)


def _ask(ref, key: int, tenant: str = "t"):
    return asyncio.ensure_future(ref.ask(
        SampleRequest(tenant=tenant, prompt_token_ids=[key], sampling=SamplingSpec(max_tokens=4))
    ))


async def test_a_publish_mid_generation_serves_beside_the_old_version_which_leaves_when_drained():
    held = Held()
    actor = _sampler(held.engine)
    with capture_logs() as logs:
        async with ActorSystem("t") as system:
            ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
            await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
            old_a, old_b = _ask(ref, 1), _ask(ref, 2)
            await until(lambda: len(held.engine.requests) == 2)
            # v1 arrives while v0 decodes: no gate, the load returns before v0's requests end
            assert (await ref.ask(LoadAdapter(tenant="t", path="p1", version=1, keep_serving=True))).version == 1
            assert actor.serving_version("t") == 1 and actor.retiring("t") == [0]
            new = _ask(ref, 3)
            held.free(3)
            assert ((await new).adapter_version, (await new).completions[0].text) == (1, "t#3@v1")
            assert not old_a.done() and 2 not in held.engine.removed  # v0 (lora id 2) still decodes
            held.free(1)
            assert ((await old_a).adapter_version, (await old_a).completions[0].text) == (0, "t#2@v0")
            assert held.engine.removed == []  # one request of v0 is left
            held.free(2)
            assert (await old_b).adapter_version == 0
            await until(lambda: held.engine.removed == [2])
            assert actor.retiring("t") == [] and set(held.engine.serving) == {3}
            assert held.engine.mixed == []
            assert all(r.version == int(r.adapter_name.rpartition("@v")[2]) for r in held.engine.requests)
    retired = [e for e in logs if e["event"] == names.ADAPTER_RETIRED]
    assert [(e["version"], e["lora_id"]) for e in retired] == [(0, 2)]
    beside = [e for e in logs if e["event"] == names.ADAPTER_LOADED_BESIDE]
    assert [(e["version"], e["previous_version"], e["previous_in_flight"]) for e in beside] == [(1, 0, 2)]


async def test_an_idle_old_version_is_unloaded_at_once_and_removal_waits_for_every_version():
    held = Held()
    actor = _sampler(held.engine)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        await ref.ask(LoadAdapter(tenant="t", path="p1", version=1, keep_serving=True))
        await until(lambda: held.engine.removed == [2])  # v0 had nothing in flight
        on_v1 = _ask(ref, 1)
        await until(lambda: len(held.engine.requests) == 1)
        await ref.ask(LoadAdapter(tenant="t", path="p2", version=2, keep_serving=True))
        on_v2 = _ask(ref, 2)
        await until(lambda: len(held.engine.requests) == 2)
        remove = asyncio.ensure_future(ref.ask(RemoveAdapter(tenant="t")))
        await asyncio.sleep(0.05)
        assert not remove.done()  # v1 and v2 each have a request decoding
        held.free(2)
        await on_v2
        await asyncio.sleep(0.05)
        assert not remove.done() and 3 not in held.engine.removed
        held.free(1)
        await remove
        assert (await on_v1).adapter_version == 1
        assert sorted(held.engine.removed) == [2, 3, 4] and held.engine.serving == {}
        assert held.engine.mixed == []


async def test_versions_never_mix_under_random_publishes_and_delays():
    rng = random.Random(7)
    engine = FakeEngine(lambda r: _slow(r, rng), max_model_len=64, max_lora_rank=16, read_adapters=False)
    actor = _sampler(engine, max_loras=2)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        for tenant in ("t", "u"):
            await ref.ask(RegisterAdapter(tenant=tenant, path="p0", version=0))

        async def publisher(tenant: str) -> None:
            for version in range(1, 8):
                await asyncio.sleep(rng.uniform(0, 0.01))
                await ref.ask(LoadAdapter(tenant=tenant, path=f"p{version}", version=version, keep_serving=True))

        async def request(i: int):
            await asyncio.sleep(rng.uniform(0, 0.08))
            return await _ask(ref, i, tenant=rng.choice("tu"))

        requests = [asyncio.ensure_future(request(i)) for i in range(60)]
        await asyncio.gather(publisher("t"), publisher("u"))
        results = await asyncio.gather(*requests)
        await until(lambda: not actor.retiring("t") and not actor.retiring("u"))
        assert len(engine.serving) == 2  # only the newest version of each tenant is left loaded
    assert engine.mixed == []
    assert engine.peak_adapters <= 2  # the engine's LoRA slots count versions, not tenants (max_loras=2)
    for result in results:  # each result names the version its text says served it
        assert result.completions[0].text.endswith(f"@v{result.adapter_version}")
    assert len({r.adapter_version for r in results}) > 1  # the publishes did land mid-run
    assert engine.serving == {}  # the sampler left the borrowed engine without its adapters


async def _slow(request: FakeRequest, rng: random.Random) -> Completion:
    await asyncio.sleep(rng.uniform(0, 0.02))
    return Completion(token_ids=[1], logprobs=[0.0], text=request.adapter_name, finish_reason="length")
