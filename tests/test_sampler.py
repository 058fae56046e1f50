"""Fast SamplerActor tests on a scripted engine: version gating, load cancellation, engine death."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors import ActorCrashed, ActorSystem, Supervision
from clora.config import EngineConfig, ModelConfig
from clora.errors import DuplicateTenantError, EngineDeadError, PromptTooLongError, UnknownTenantError
from clora.messages import Completion, GetEngineStats, LoadAdapter, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.testing import FakeEngine, FakeRequest


class Gate:
    """A fake engine whose request finishes when the test releases its prompt's first token; the
    completion's text is the name of the adapter that served it (``tenant#lora_id@vN`` or "base")."""

    def __init__(self) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.engine = FakeEngine(self.answer, max_model_len=64, max_lora_rank=16, read_adapters=False)

    async def answer(self, request: FakeRequest) -> Completion:
        lora_id = request.lora_id
        served_by = "base" if lora_id is None else self.engine.serving[lora_id].name
        await self.release.setdefault(request.prompt_token_ids[0], asyncio.Event()).wait()
        # the weights must not have changed while this sequence decoded
        assert lora_id is None or self.engine.serving[lora_id].name == served_by
        return Completion(token_ids=[1], logprobs=[0.0], text=served_by, finish_reason="length")

    def reloads(self) -> list[tuple[int, str]]:
        return [(a.lora_id, a.name) for a in self.engine.adapters if a.kind == "reload"]


def _sampler(engine: FakeEngine) -> SamplerActor:
    return SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=engine)


def _ask(ref, tenant, key: int):
    return asyncio.ensure_future(ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[key], sampling=SamplingSpec(max_tokens=4))))


async def test_load_waits_for_the_tenants_in_flight_requests_and_gates_new_ones():
    gate = Gate()
    actor = _sampler(gate.engine)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        await ref.ask(RegisterAdapter(tenant="u", path="q0", version=0))
        old = _ask(ref, "t", 1)
        other = _ask(ref, "u", 2)
        await asyncio.sleep(0.01)
        load = asyncio.ensure_future(ref.ask(LoadAdapter(tenant="t", path="p1", version=1)))
        await asyncio.sleep(0.01)
        new = _ask(ref, "t", 3)
        gate.release[3] = asyncio.Event()
        gate.release[3].set()  # would finish at once, but it must wait for the load
        await asyncio.sleep(0.05)
        assert not load.done() and not new.done() and gate.reloads() == []
        gate.release[2].set()  # another tenant is not gated
        assert (await other).completions[0].text == "u#3@v0"
        gate.release[1].set()
        assert ((await old).adapter_version, (await old).completions[0].text) == (0, "t#2@v0")
        assert (await load).version == 1
        assert ((await new).adapter_version, (await new).completions[0].text) == (1, "t#2@v1")
        assert actor.serving_version("t") == 1


async def test_a_cancelled_load_still_records_what_the_engine_holds():
    gate = Gate()
    gate.engine.load_s = 0.2
    actor = _sampler(gate.engine)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        load = asyncio.ensure_future(ref.ask(LoadAdapter(tenant="t", path="p1", version=1)))
        await asyncio.sleep(0.05)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        await asyncio.sleep(0.3)
        assert gate.engine.serving[2].name == "t#2@v1" and actor.serving_version("t") == 1
        gate.release[5] = asyncio.Event()
        gate.release[5].set()
        result = await _ask(ref, "t", 5)
        assert (result.adapter_version, result.completions[0].text) == (1, "t#2@v1")


async def test_request_errors_concern_that_request_only():
    gate = Gate()
    async with ActorSystem("t") as system:
        ref = await system.start(_sampler(gate.engine), name="sampler", supervision=Supervision.ESCALATE)
        assert await ref.ask(GetEngineStats()) is None  # this engine keeps no statistics
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        with pytest.raises(DuplicateTenantError):
            await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        with pytest.raises(UnknownTenantError, match="'ghost'.*registered: \\['t'\\]"):
            await _ask(ref, "ghost", 1)
        with pytest.raises(UnknownTenantError):
            await ref.ask(LoadAdapter(tenant="ghost", path="p", version=1))
        with pytest.raises(PromptTooLongError):
            await ref.ask(SampleRequest(tenant="t", prompt_token_ids=[1] * 61, sampling=SamplingSpec(max_tokens=4)))
        gate.release[4] = asyncio.Event()
        gate.release[4].set()
        assert (await _ask(ref, None, 4)).adapter_version == -1


async def test_engine_death_crashes_the_sampler_and_escalates():
    gate = Gate()
    gate.engine.kill("test")
    with pytest.raises(ActorCrashed) as crashed:
        async with ActorSystem("t") as system:
            ref = await system.start(_sampler(gate.engine), name="sampler", supervision=Supervision.ESCALATE)
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await _ask(ref, None, 1)
            await asyncio.sleep(1)  # the crash cancels this body
    assert isinstance(crashed.value.cause, EngineDeadError)
    assert "sampler stops" in str(crashed.value)


async def test_engine_stats_lines_carry_what_the_engine_did_and_the_totals_at_stop():
    from clora import events
    from clora.sampler.engine_stats import EngineStats
    from clora.testing import capture_events

    gate = Gate()
    gate.engine.stats = EngineStats()  # the real engine's counters, fed by hand here
    stats = gate.engine.stats
    actor = SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=gate.engine,
                         stats_interval_s=0.0)
    with capture_events() as logged:
        async with ActorSystem("t") as system:
            ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
            stats.observe_outputs(prompt_tokens=999, computed=999, cached=0, generated=0)  # after the start: counted
            await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
            request = _ask(ref, "t", 1)
            await asyncio.sleep(0.01)
            stats.observe_outputs(prompt_tokens=240, computed=112, cached=128, generated=4)
            stats.observe_step(running=4, waiting=0, prefix_requests=4, prefix_queries=960, prefix_hits=512,
                               prefill_requests=0, decode_requests=4, now=1.0)
            gate.release.setdefault(1, asyncio.Event()).set()
            await request
            asked = await ref.ask(GetEngineStats())
            assert (asked.prompt_tokens, asked.prompt_tokens_cached, asked.decode_rows) == (240 + 999, 128, 4)
            stats.observe_outputs(prompt_tokens=10, computed=10, cached=0, generated=1)
    windows = logged.named(events.ENGINE_STATS)
    totals = logged.named(events.ENGINE_TOTALS)
    assert windows.field("prompt_tokens") == [999 + 240, 10]  # one line per request (interval 0), one at stop
    assert windows[0]["prompt_tokens_cached"] == 128 and windows[0]["decode_batches"] == {"4-7": 1}
    assert len(totals) == 1 and totals[0]["prompt_tokens"] == 999 + 250 and totals[0]["generation_tokens"] == 5
