"""The sampler under the scheduler, on a scripted engine: admission order by priority, and adapter
paging (more tenants than the engine keeps adapters for) that never evicts an adapter in use and
always serves the version a request asked for."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import structlog

from actors import ActorSystem
from clora import events
from clora.config import EngineConfig, ModelConfig
from clora.messages import Completion, LoadAdapter, RegisterAdapter, RemoveAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.sched import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, Scheduler
from clora.testing import FakeEngine, capture_events, until

pytestmark = pytest.mark.timeout(60)

ANSWER = Completion(token_ids=[1], logprobs=[0.0], text="x", finish_reason="length")


class CheckingEngine(FakeEngine):
    """A FakeEngine whose every request checks, when it finishes decoding, that the engine serves its
    LoRA id with exactly the version the request names; and that it never holds more than ``resident``."""

    def __init__(self, resident: int, decode_s: float = 0.01) -> None:
        super().__init__(self._answer, max_model_len=64, read_adapters=False, decode_s=decode_s)
        self.resident = resident
        self.wrong: list[str] = []
        self.most_resident = 0

    def _answer(self, request):
        serving = self.serving.get(request.lora_id)
        if serving is None:
            self.wrong.append(f"{request.tenant} v{request.version}: lora {request.lora_id} paged out while decoding")
        elif serving.version != request.version or serving.tenant != request.tenant:
            self.wrong.append(f"{request.tenant} v{request.version}: served by {serving.tenant} v{serving.version}")
        return ANSWER

    async def _load(self, name, lora_id, path, kind):
        duration = await super()._load(name, lora_id, path, kind)
        tenant_ids = [i for i in self.serving if i != 1]
        self.most_resident = max(self.most_resident, len(tenant_ids))
        return duration


async def _start(system, engine, *, max_loras, resident=None, scheduler=None):
    actor = SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(max_loras=max_loras),
                         shared_engine=engine, scheduler=scheduler, max_resident=resident)
    return actor, await system.start(actor, name="sampler")


def _sample(ref, tenant):
    return ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[1, 2], sampling=SamplingSpec(max_tokens=2)))


async def test_a_free_engine_slot_goes_to_the_highest_priority_then_the_least_served():
    engine = FakeEngine([ANSWER], max_model_len=64, read_adapters=False, decode_s=0.05)
    scheduler = Scheduler(aging_s=1000, yield_to_higher="never")  # the slot order alone (yielding: test_sched_yield_sampler)
    scheduler.set_policy("hi", priority=PRIORITY_INTERACTIVE)
    scheduler.set_policy("bg", priority=PRIORITY_BACKGROUND)
    async with ActorSystem("t") as system:
        actor, ref = await _start(system, engine, max_loras=1, scheduler=scheduler)
        for t in ("first", "bg", "n1", "hi"):
            await ref.ask(RegisterAdapter(tenant=t, path=f"/nowhere/{t}", version=0))
        holder = asyncio.ensure_future(_sample(ref, "first"))  # holds the one slot
        await until(lambda: actor.lora_slots_free() == 0)
        waiting = []
        for t in ("bg", "n1", "hi"):  # arrival order: bg, n1, hi
            waiting.append(asyncio.ensure_future(_sample(ref, t)))
            await until(lambda t=t: actor.in_flight(t) == 1)
        await asyncio.gather(holder, *waiting)
        order = [r.tenant for r in engine.requests]
        assert order == ["first", "hi", "n1", "bg"]  # class first, then arrival: not FIFO


async def test_paging_serves_every_tenant_with_the_version_it_asked_for_and_never_evicts_one_in_use():
    max_loras, resident, tenants = 2, 3, 7
    engine = CheckingEngine(resident)
    rng = random.Random(0)
    with capture_events() as seen:
        async with ActorSystem("t") as system:
            actor, ref = await _start(system, engine, max_loras=max_loras, resident=resident)
            names = [f"t{i}" for i in range(tenants)]
            for t in names:
                await ref.ask(RegisterAdapter(tenant=t, path=f"/nowhere/{t}/v0", version=0))
            versions = dict.fromkeys(names, 0)

            async def tenant_loop(t):
                for _ in range(4):  # sample a few requests at once, then publish a new version (an RL step)
                    results = await asyncio.gather(*(_sample(ref, t) for _ in range(rng.randint(1, 3))))
                    assert {r.adapter_version for r in results} == {versions[t]}
                    versions[t] += 1
                    await ref.ask(LoadAdapter(tenant=t, path=f"/nowhere/{t}/v{versions[t]}", version=versions[t]))

            await asyncio.gather(*(tenant_loop(t) for t in names))
            assert engine.wrong == []  # every request found its own version in the engine while it decoded
            assert engine.most_resident <= resident  # the engine never held more than the pager allows
            assert engine.peak_adapters <= max_loras
            assert len(actor.resident()) <= resident
            assert actor.pager.page_ins > 0 and actor.pager.page_outs > 0
            await ref.ask(RemoveAdapter(tenant="t0"))
    page_ins = seen.named(events.SCHEDULER_PAGE_IN)
    assert len(page_ins) == actor.pager.page_ins and all(e["duration_s"] >= 0 for e in page_ins)
    assert all(e["for_tenant"] != e["tenant"] for e in seen.named(events.SCHEDULER_PAGE_OUT))


async def test_a_version_published_while_paged_out_is_the_one_paged_in():
    engine = CheckingEngine(resident=2)
    async with ActorSystem("t") as system:
        actor, ref = await _start(system, engine, max_loras=1, resident=2)
        for t in ("a", "b", "c"):
            await ref.ask(RegisterAdapter(tenant=t, path=f"/nowhere/{t}/v0", version=0))
        assert actor.resident() == {"b", "c"}  # registering c paged a out: the engine keeps two
        assert (await _sample(ref, "a")).adapter_version == 0  # a pages in, b goes (never scheduled; by name)
        assert actor.resident() == {"a", "c"}
        assert (await _sample(ref, "c")).adapter_version == 0  # resident: no paging
        await ref.ask(LoadAdapter(tenant="b", path="/nowhere/b/v5", version=5))  # b is paged out: recorded only
        assert actor.serving_version("b") == 5
        result = await _sample(ref, "b")
        assert result.adapter_version == 5
        assert actor.resident() == {"b", "c"}  # a was scheduled before c: a went
        assert [(a.version, a.kind) for a in engine.loaded("b")] == [(0, "add"), (5, "add")]
        assert engine.wrong == []


def test_the_page_out_victim_is_never_in_the_engine_nor_changing_and_least_recently_scheduled_first():
    from types import SimpleNamespace

    from clora.sampler.paging import AdapterPager

    def slot(tenant, *, last, in_flight=0, resident=True):
        return SimpleNamespace(tenant=tenant, lora_id=0, version=0, in_flight=in_flight, resident=resident,
                               last_scheduled=last)

    in_engine, changing = {"old"}, {"older"}
    pager = AdapterPager(3, log=lambda: None, in_engine=in_engine.__contains__, changing=changing.__contains__)
    slots = [slot("old", last=0, in_flight=2), slot("older", last=-1), slot("waits", last=1, in_flight=1),
             slot("idle", last=5), slot("out", last=-5, resident=False), slot("me", last=-9, resident=False)]
    assert pager.victim(slots, keep="me").tenant == "idle"  # no request at all beats an older one that waits
    slots = [s for s in slots if s.tenant != "idle"]
    assert pager.victim(slots, keep="me").tenant == "waits"  # its requests wait outside the engine
    slots = [s for s in slots if s.tenant != "waits"]
    assert pager.victim(slots, keep="me") is None  # only one in the engine and one being replaced are left


async def test_a_tenant_waiting_for_an_engine_slot_past_the_bound_is_reported_without_any_decision():
    release = asyncio.Event()

    async def script(request):
        if request.tenant == "holder":
            await release.wait()
        return ANSWER

    engine = FakeEngine(script, max_model_len=64, read_adapters=False)
    with capture_events() as seen:
        async with ActorSystem("t") as system:
            scheduler = Scheduler(wait_bound_s=0.05, log=structlog.get_logger())
            actor, ref = await _start(system, engine, max_loras=1, scheduler=scheduler)
            for t in ("holder", "late"):
                await ref.ask(RegisterAdapter(tenant=t, path=f"/nowhere/{t}", version=0))
            held = asyncio.ensure_future(_sample(ref, "holder"))
            await until(lambda: actor.lora_slots_free() == 0)
            waiting = asyncio.ensure_future(_sample(ref, "late"))
            await until(lambda: seen.named(events.SCHEDULER_WAIT_EXCEEDED), timeout=5)
            await asyncio.sleep(0.2)  # several more bound periods: still one event for this wait
            release.set()
            await asyncio.gather(held, waiting)
    late = seen.named(events.SCHEDULER_WAIT_EXCEEDED)
    assert [(e["tenant"], e["resource"]) for e in late] == [("late", "decode")]
