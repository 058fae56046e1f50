"""Adapter paging on the real vLLM engine (tiny model, the session's shared engine): six tenants on four
resident adapters give the same greedy tokens after a page-out and page-in as before, and a version
published while a tenant is paged out is the one its next request runs on."""

from __future__ import annotations

import asyncio

import pytest

from actors import ActorSystem, Supervision
from clora.messages import LoadAdapter, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.sampler.engine import BASE_ADAPTER_ID

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

GREEDY = SamplingSpec(max_tokens=8, temperature=0.0)
RESIDENT = 4  # tiny_engine_config.max_loras is 3


async def _tokens(ref, tenant, prompt):
    result = await ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=prompt, sampling=GREEDY))
    return tuple(result.completions[0].token_ids), result.adapter_version


async def test_paged_adapters_answer_exactly_as_before_and_with_the_version_asked_for(
        tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config, tiny_adapters):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    weights = {"t0": "a1", "t1": "a2", "t2": "a3", "t3": "a4", "t4": "a1", "t5": "a2"}
    actor = SamplerActor(tiny_model_dir, tiny_model_config, tiny_engine_config, shared_engine=tiny_engine,
                         max_resident=RESIDENT)
    async with ActorSystem("paging") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        for tenant, adapter in weights.items():
            await ref.ask(RegisterAdapter(tenant=tenant, path=str(tiny_adapters[adapter]), version=0))
        first = {t: await _tokens(ref, t, prompt) for t in weights}  # one after another: pages in turn
        assert actor.pager.page_outs > 0
        assert first["t0"] == first["t4"] and first["t1"] == first["t5"]  # same weights, other tenants
        assert len({first[t] for t in ("t0", "t1", "t2", "t3")}) == 4  # the adapters really differ
        for _ in range(2):  # all at once, more tenants than slots and than resident adapters
            again = await asyncio.gather(*(_tokens(ref, t, prompt) for t in weights))
            assert dict(zip(weights, again)) == first
        loaded = await tiny_engine.loaded_adapter_ids()
        assert len(loaded - {BASE_ADAPTER_ID}) <= RESIDENT

        for t in ("t1", "t2", "t3", "t5"):  # t0 is least recently scheduled now: paged out
            await _tokens(ref, t, prompt)
        assert "t0" not in actor.resident()
        await ref.ask(LoadAdapter(tenant="t0", path=str(tiny_adapters["a4"]), version=1))
        assert await _tokens(ref, "t0", prompt) == (first["t3"][0], 1)  # a4's tokens, as version 1
