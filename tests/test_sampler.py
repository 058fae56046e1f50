"""Fast SamplerActor tests on a scripted engine: version gating, load cancellation, engine death."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors import ActorCrashed, ActorSystem, Supervision
from clora.config import EngineConfig, ModelConfig
from clora.sampler.engine import GenerationOutput
from clora.errors import DuplicateTenantError, EngineDeadError, PromptTooLongError, UnknownTenantError
from clora.messages import Completion, LoadAdapter, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor


class ScriptedEngine:
    """Engine stand-in: a request finishes when its prompt's first token is released; the completion
    is the adapter name that served it. Loads take ``load_seconds``."""

    max_lora_rank = 16
    max_model_len = 64

    def __init__(self) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.weights: dict[int, str] = {}
        self.loads: list[tuple[int, str]] = []
        self.load_seconds = 0.0
        self.dead = False
        self.is_dead = False
        self._ids = iter(range(2, 1000))

    def check_prompt(self, prompt, max_tokens) -> None:
        if len(prompt) + max_tokens > self.max_model_len:
            raise PromptTooLongError("too long")

    def check_adapter(self, path) -> None:
        pass

    def allocate_adapter_id(self) -> int:
        return next(self._ids)

    async def add_adapter(self, name, lora_id, path) -> float:
        self.weights[lora_id] = name
        return 0.0

    async def reload_adapter(self, name, lora_id, path) -> float:
        await asyncio.sleep(self.load_seconds)
        self.weights[lora_id] = name
        self.loads.append((lora_id, name))
        return self.load_seconds

    async def remove_adapter(self, lora_id) -> None:
        self.weights.pop(lora_id)

    async def generate(self, prompt, spec, adapter) -> GenerationOutput:
        if self.dead:
            self.is_dead = True
            raise EngineDeadError("the vLLM engine process died: test")
        served_by = "base" if adapter is None else self.weights[adapter[1]]
        await self.release.setdefault(prompt[0], asyncio.Event()).wait()
        # the weights must not have changed while this sequence decoded
        assert adapter is None or self.weights[adapter[1]] == served_by
        completion = Completion(token_ids=[1], logprobs=[0.0], text=served_by, finish_reason="length")
        return GenerationOutput(prompt_token_ids=list(prompt), completions=[completion])


def _sampler(engine: ScriptedEngine) -> SamplerActor:
    return SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=engine)


def _ask(ref, tenant, key: int):
    return asyncio.ensure_future(ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[key], sampling=SamplingSpec(max_tokens=4))))


async def test_load_waits_for_the_tenants_in_flight_requests_and_gates_new_ones():
    engine = ScriptedEngine()
    actor = _sampler(engine)
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
        engine.release[3] = asyncio.Event()
        engine.release[3].set()  # would finish at once, but it must wait for the load
        await asyncio.sleep(0.05)
        assert not load.done() and not new.done() and engine.loads == []
        engine.release[2].set()  # another tenant is not gated
        assert (await other).completions[0].text == "u#3@v0"
        engine.release[1].set()
        assert ((await old).adapter_version, (await old).completions[0].text) == (0, "t#2@v0")
        assert (await load).version == 1
        assert ((await new).adapter_version, (await new).completions[0].text) == (1, "t#2@v1")
        assert actor.serving_version("t") == 1


async def test_a_cancelled_load_still_records_what_the_engine_holds():
    engine = ScriptedEngine()
    engine.load_seconds = 0.2
    actor = _sampler(engine)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        load = asyncio.ensure_future(ref.ask(LoadAdapter(tenant="t", path="p1", version=1)))
        await asyncio.sleep(0.05)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        await asyncio.sleep(0.3)
        assert engine.weights[2] == "t#2@v1" and actor.serving_version("t") == 1
        engine.release[5] = asyncio.Event()
        engine.release[5].set()
        result = await _ask(ref, "t", 5)
        assert (result.adapter_version, result.completions[0].text) == (1, "t#2@v1")


async def test_request_errors_concern_that_request_only():
    engine = ScriptedEngine()
    async with ActorSystem("t") as system:
        ref = await system.start(_sampler(engine), name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        with pytest.raises(DuplicateTenantError):
            await ref.ask(RegisterAdapter(tenant="t", path="p0", version=0))
        with pytest.raises(UnknownTenantError, match="'ghost'.*registered: \\['t'\\]"):
            await _ask(ref, "ghost", 1)
        with pytest.raises(UnknownTenantError):
            await ref.ask(LoadAdapter(tenant="ghost", path="p", version=1))
        with pytest.raises(PromptTooLongError):
            await ref.ask(SampleRequest(tenant="t", prompt_token_ids=[1] * 61, sampling=SamplingSpec(max_tokens=4)))
        engine.release[4] = asyncio.Event()
        engine.release[4].set()
        assert (await _ask(ref, None, 4)).adapter_version == -1


async def test_engine_death_crashes_the_sampler_and_escalates():
    engine = ScriptedEngine()
    engine.dead = True
    with pytest.raises(ActorCrashed) as crashed:
        async with ActorSystem("t") as system:
            ref = await system.start(_sampler(engine), name="sampler", supervision=Supervision.ESCALATE)
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await _ask(ref, None, 1)
            await asyncio.sleep(1)  # the crash cancels this body
    assert isinstance(crashed.value.cause, EngineDeadError)
    assert "sampler stops" in str(crashed.value)
