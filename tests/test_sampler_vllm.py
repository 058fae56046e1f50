"""SamplerActor on the real vLLM engine (tiny model, fp32, the session's shared engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors import ActorSystem, Supervision
from clora.errors import AdapterMismatchError, PromptTooLongError, UnknownTenantError
from clora.messages import LoadAdapter, RegisterAdapter, RemoveAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import BASE_VERSION, SamplerActor

pytestmark = pytest.mark.vllm

GREEDY = SamplingSpec(max_tokens=10, temperature=0.0)
LONG = SamplingSpec(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = ("What is 12 plus 30?", "Name three colors.")
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                return_dict=False)
        for q in questions
    ]


@pytest.fixture
async def sampler(tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config):
    """A SamplerActor on the shared engine, its actor object and its ref."""
    actor = SamplerActor(tiny_model_dir, tiny_model_config, tiny_engine_config, shared_engine=tiny_engine)
    async with ActorSystem("test") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        yield actor, ref


async def _tokens(ref, tenant, prompt, spec=GREEDY):
    result = await ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=prompt, sampling=spec))
    return result.completions[0].token_ids, result.adapter_version


async def test_mixed_tenants_and_base_equal_each_alone(sampler, tiny_adapters, prompts):
    _, ref = sampler
    for name in ("a1", "a2", "a3"):
        await ref.ask(RegisterAdapter(tenant=name, path=str(tiny_adapters[name]), version=0))
    tenants = [None, "a1", "a2", "a3"]
    alone = {(t, i): await _tokens(ref, t, p) for t in tenants for i, p in enumerate(prompts)}
    keys = list(alone)
    mixed = await asyncio.gather(*(_tokens(ref, t, prompts[i]) for t, i in keys))
    assert dict(zip(keys, mixed)) == alone
    assert all(alone[None, i][1] == BASE_VERSION for i in range(len(prompts)))
    assert all(alone[t, 0][1] == 0 for t in ("a1", "a2", "a3"))
    assert len({tuple(alone[t, 0][0]) for t in tenants}) == len(tenants)  # all four really differ


async def test_update_serves_new_weights_without_aborting_other_tenants(sampler, tiny_adapters, prompts):
    actor, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
    await ref.ask(RegisterAdapter(tenant="other", path=str(tiny_adapters["a2"]), version=0))
    await ref.ask(RegisterAdapter(tenant="ref4", path=str(tiny_adapters["a4"]), version=0))
    want_new, _ = await _tokens(ref, "ref4", prompts[0])
    before, version = await _tokens(ref, "t", prompts[0])
    assert version == 0 and before != want_new
    want_long, _ = await _tokens(ref, "other", prompts[1], LONG)

    long = asyncio.ensure_future(_tokens(ref, "other", prompts[1], LONG))
    while actor.in_flight("other") == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # it is decoding now
    loaded = await ref.ask(LoadAdapter(tenant="t", path=str(tiny_adapters["a4"]), version=1))
    assert loaded.version == 1 and not long.done()
    after, version = await _tokens(ref, "t", prompts[0])
    assert (after, version) == (want_new, 1)
    assert actor.serving_version("t") == 1
    assert await long == (want_long, 0)  # not aborted, not disturbed: same tokens as alone


async def test_a_tenants_in_flight_request_finishes_on_its_version_before_the_update(
    sampler, tiny_adapters, prompts
):
    actor, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
    want_old, _ = await _tokens(ref, "t", prompts[1], LONG)
    in_flight = asyncio.ensure_future(_tokens(ref, "t", prompts[1], LONG))
    while actor.in_flight("t") == 0:
        await asyncio.sleep(0.01)
    load = asyncio.ensure_future(ref.ask(LoadAdapter(tenant="t", path=str(tiny_adapters["a3"]), version=7)))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(_tokens(ref, "t", prompts[0]))  # sent while the load is pending
    await asyncio.sleep(0.2)
    assert not load.done() and not waiting.done()  # gated behind the in-flight sequence
    assert await in_flight == (want_old, 0)
    await load
    tokens, version = await waiting
    assert version == 7
    await ref.ask(RegisterAdapter(tenant="ref3", path=str(tiny_adapters["a3"]), version=0))
    assert tokens == (await _tokens(ref, "ref3", prompts[0]))[0]


async def test_cancelling_a_sample_ask_aborts_the_engine_request(sampler, tiny_engine, tiny_adapters, prompts):
    actor, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
    spec = SamplingSpec(max_tokens=900, temperature=0.0, ignore_eos=True)
    ask = asyncio.ensure_future(_tokens(ref, "t", prompts[0], spec))
    while tiny_engine.num_unfinished_requests() == 0:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    ask.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ask
    while tiny_engine.num_unfinished_requests() and time.monotonic() - started < 5:
        await asyncio.sleep(0.02)
    assert tiny_engine.num_unfinished_requests() == 0
    assert time.monotonic() - started < 5  # aborted, not decoded to the end
    assert actor.in_flight("t") == 0


async def test_bad_requests_fail_alone_while_a_good_one_succeeds(sampler, tiny_adapters, prompts):
    _, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
    results = await asyncio.gather(
        _tokens(ref, "nobody", prompts[0]),
        _tokens(ref, "t", [7] * 1020, SamplingSpec(max_tokens=10)),
        _tokens(ref, "t", prompts[0]),
        return_exceptions=True,
    )
    assert isinstance(results[0], UnknownTenantError) and "nobody" in str(results[0])
    assert isinstance(results[1], PromptTooLongError)
    tokens, version = results[2]
    assert len(tokens) == GREEDY.max_tokens and version == 0


async def test_n_samples_come_back_with_token_aligned_logprobs(sampler, tiny_adapters, prompts):
    _, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=3))
    spec = SamplingSpec(n=4, max_tokens=12, temperature=1.0, seed=11)
    result = await ref.ask(SampleRequest(tenant="t", prompt_token_ids=prompts[0], sampling=spec))
    assert result.adapter_version == 3 and result.prompt_token_ids == prompts[0]
    assert len(result.completions) == 4
    assert len({tuple(c.token_ids) for c in result.completions}) > 1  # really sampled
    for c in result.completions:
        assert 0 < len(c.token_ids) == len(c.logprobs) <= 12
        assert all(lp <= 0.0 for lp in c.logprobs) and c.finish_reason in ("length", "stop")


async def test_register_refuses_an_adapter_the_engine_cannot_serve(sampler, tiny_adapters, prompts):
    _, ref = sampler
    with pytest.raises(AdapterMismatchError, match="rank 32"):
        await ref.ask(RegisterAdapter(tenant="big", path=str(tiny_adapters["big"]), version=0))
    with pytest.raises(UnknownTenantError):
        await _tokens(ref, "big", prompts[0])


async def test_removed_tenant_is_unknown(sampler, tiny_engine, tiny_adapters, prompts):
    actor, ref = sampler
    await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
    await _tokens(ref, "t", prompts[0])
    loaded_before = await tiny_engine.loaded_adapter_ids()
    await ref.ask(RemoveAdapter(tenant="t"))
    assert actor.serving_version("t") is None
    assert len(await tiny_engine.loaded_adapter_ids()) == len(loaded_before) - 1
    with pytest.raises(UnknownTenantError):
        await _tokens(ref, "t", prompts[0])


async def test_owned_engine_death_crashes_the_sampler_and_stops_the_system(
    tiny_model_dir, tiny_model_config, prompts, tmp_path
):
    """A sampler with its own engine; killing that engine process is fatal and escalates."""
    import os
    import signal

    import psutil

    from actors import ActorCrashed
    from clora.config import EngineConfig
    from clora.errors import EngineDeadError

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=4, kv_cache_gib=1.0)
    actor = SamplerActor(tiny_model_dir, tiny_model_config, config, work_dir=tmp_path)
    with pytest.raises(ActorCrashed) as crashed:
        async with ActorSystem("death") as system:
            ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
            assert (await _tokens(ref, None, prompts[0]))[1] == BASE_VERSION
            ours = [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in before and "EngineCore" in p.name()]
            assert len(ours) == 1
            ask = asyncio.ensure_future(_tokens(ref, None, prompts[0], LONG))
            await asyncio.sleep(0.5)
            os.kill(ours[0].pid, signal.SIGKILL)
            with pytest.raises((EngineDeadError, ActorCrashed)):
                await ask
            await asyncio.sleep(5)  # the crash cancels this body
    assert isinstance(crashed.value.cause, EngineDeadError)
    with pytest.raises(RuntimeError, match="not running"):  # on_failure shut the engine down
        actor.engine
