"""The scheduler inside a Runtime (tiny model, clora.testing.FakeEngine): a priority changed at run time
decides the next admission; more tenants than the engine keeps adapters for are paged, and every sample
still comes from the version its tenant asked for."""

from __future__ import annotations

import asyncio

import pytest

import clora.runtime
from clora import events as names
from clora.config import EngineConfig, LoraConfig, LossConfig, ModelConfig, RuntimeConfig, SchedulerConfig
from clora.errors import ConfigError, UnknownTenantError
from clora.messages import Completion
from clora.rl.rollout import completion_datum
from clora.sched import PRIORITY_INTERACTIVE
from clora.testing import Events, FakeEngine, until

pytestmark = pytest.mark.timeout(180)


def _config(tiny_model_dir, tmp_path, **scheduler) -> RuntimeConfig:
    return RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path / "run"),
                         engine=EngineConfig(max_loras=1), scheduler=SchedulerConfig(**scheduler))


async def test_a_priority_raised_at_run_time_wins_the_next_engine_slot(tiny_model_dir, tmp_path):
    release = asyncio.Event()

    async def script(request):
        if request.tenant == "holder":
            await release.wait()  # holds the engine's one LoRA slot until the test lets go
        return Completion(token_ids=[7], logprobs=[-1.0], text="x", finish_reason="stop")

    engine = FakeEngine(script, read_adapters=False)
    config = _config(tiny_model_dir, tmp_path, yield_to_higher="engine", linger_s=0.5)
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        assert (rt.scheduler.yield_to_higher, rt.scheduler.linger_s) == ("engine", 0.5)  # [scheduler] reaches it
        holder, a, b = [await rt.tenant(n, lora=LoraConfig(rank=4, alpha=8.0)) for n in ("holder", "a", "b")]
        held = asyncio.ensure_future(holder.sample([5, 6], max_tokens=2))
        await until(lambda: len(engine.requests) == 1)
        waiting = [asyncio.ensure_future(t.sample([5, 6], max_tokens=2)) for t in (a, b)]
        await asyncio.sleep(0.05)  # both wait for the slot; a asked first
        b.set_priority(PRIORITY_INTERACTIVE)
        release.set()
        await asyncio.gather(held, *waiting)
        assert [r.tenant for r in engine.requests] == ["holder", "b", "a"]
        with pytest.raises(UnknownTenantError, match="nobody"):
            rt.set_priority("nobody", 1)
        with pytest.raises(ConfigError, match="weight"):
            a.set_priority(weight=0)
    events = Events.from_run(tmp_path / "run")
    assert events.named(names.SCHEDULER_POLICY_CHANGED, tenant="b", priority=PRIORITY_INTERACTIVE)
    decision = events.named(names.SCHEDULER_DECISION, resource="decode")[-1]
    assert decision["chosen"] == ["b"] and decision["reason"] == "priority"


async def test_more_tenants_than_resident_adapters_train_and_sample_their_own_versions(tiny_model_dir, tmp_path):
    wrong: list[str] = []

    def script(request):  # the engine serves the request's LoRA id with the version it names, to the end
        loaded = engine.serving.get(request.lora_id)
        if loaded is None or (loaded.tenant, loaded.version) != (request.tenant, request.version):
            has = loaded and (loaded.tenant, loaded.version)
            wrong.append(f"{request.tenant} v{request.version}: engine has {has}")
        return Completion(token_ids=[100 + request.index % 7, 101], logprobs=[-1.0, -1.0], text="x",
                          finish_reason="stop")

    engine = FakeEngine(script, decode_s=0.005)
    config = _config(tiny_model_dir, tmp_path, max_resident_adapters=2)
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        handles = [await rt.tenant(f"t{i}", lora=LoraConfig(rank=4, alpha=8.0)) for i in range(4)]

        async def loop(handle):
            for _ in range(2):
                group = await handle.sample([5, 6, 7], n=2, max_tokens=2)
                assert group.adapter_version == handle.version
                data = [completion_datum(group.prompt_token_ids, c, advantage=a)
                        for c, a in zip(group.completions, (1.0, -1.0))]
                await handle.train_step(data, LossConfig(kind="importance_sampling"))
                await handle.publish()

        await asyncio.gather(*(loop(h) for h in handles))
        for handle in handles:
            assert handle.version == 2
            assert (await handle.sample([5, 6], max_tokens=2)).adapter_version == 2
        assert wrong == []
    events = Events.from_run(tmp_path / "run")
    page_ins = events.named(names.SCHEDULER_PAGE_IN)
    assert page_ins and all(e["resident"] <= 2 for e in page_ins)
    assert {e["tenant"] for e in page_ins} <= {h.name for h in handles}
    versions = {(e["tenant"], e["version"]) for e in page_ins}
    published = {(e["tenant"], e["adapter_version"]) for e in events.named(names.ADAPTER_PUBLISHED)}
    assert versions <= published  # a page-in loads a version that was published, never another
