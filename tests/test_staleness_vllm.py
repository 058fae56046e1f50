"""Versions side by side on the real vLLM engine (tiny model, fp32, the session's shared engine), and one
off-policy tenant end to end. Marked ``vllm``: not in the default run.

A publish lands while the tenant's long greedy request decodes: the request must finish with exactly
the tokens the old version gives alone (no sequence mixes versions), a request sent after the
publish must get the new version's tokens at once (no gate), and the old LoRA id must leave the
engine once its request ended.
"""

from __future__ import annotations

import asyncio

import pytest

from actors import ActorSystem, Supervision
from clora.config import EngineConfig, EnvConfig, ExperimentConfig, LoraConfig, OptimConfig, RuntimeConfig
from clora.events import read_events
from clora.messages import LoadAdapter, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.testing import ToyEnv, until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

GREEDY = SamplingSpec(max_tokens=10, temperature=0.0)
LONG = SamplingSpec(max_tokens=300, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt(tiny_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)


async def _tokens(ref, tenant, prompt, spec):
    result = await ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=prompt, sampling=spec))
    return result.completions[0].token_ids, result.adapter_version


async def test_a_publish_mid_generation_never_mixes_versions_and_the_old_one_leaves(
    tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config, tiny_adapters, prompt
):
    actor = SamplerActor(tiny_model_dir, tiny_model_config, tiny_engine_config, shared_engine=tiny_engine)
    async with ActorSystem("test") as system:
        ref = await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)
        await ref.ask(RegisterAdapter(tenant="ref4", path=str(tiny_adapters["a4"]), version=0))
        want_new, _ = await _tokens(ref, "ref4", prompt, GREEDY)
        before = await tiny_engine.loaded_adapter_ids()
        await ref.ask(RegisterAdapter(tenant="t", path=str(tiny_adapters["a1"]), version=0))
        (v0_id,) = await tiny_engine.loaded_adapter_ids() - before
        want_old_long, _ = await _tokens(ref, "t", prompt, LONG)

        long = asyncio.ensure_future(_tokens(ref, "t", prompt, LONG))
        await until(lambda: actor.in_flight("t") == 1)
        await asyncio.sleep(0.3)  # it is decoding now
        loaded = await ref.ask(LoadAdapter(tenant="t", path=str(tiny_adapters["a4"]), version=1, keep_serving=True))
        assert loaded.version == 1 and not long.done() and actor.retiring("t") == [0]
        (v1_id,) = await tiny_engine.loaded_adapter_ids() - before - {v0_id}
        assert await _tokens(ref, "t", prompt, GREEDY) == (want_new, 1)  # served at once, beside v0
        assert not long.done()
        assert await long == (want_old_long, 0)  # every token from v0
        await until(lambda: actor.retiring("t") == [], timeout=30)
        ids = await tiny_engine.loaded_adapter_ids()
        assert v0_id not in ids and v1_id in ids  # the old version left the engine once drained


async def test_an_off_policy_tenant_trains_within_its_bound_on_vllm(tiny_model_dir, tiny_engine, tmp_path):
    import clora

    config = RuntimeConfig(
        model=clora.ModelConfig(source=str(tiny_model_dir), max_model_len=512),
        engine=EngineConfig(max_loras=3, max_lora_rank=8, max_num_seqs=32, kv_cache_gib=1.0),
        run_dir=str(tmp_path / "run"),
    )
    exp = ExperimentConfig(
        name="async", lora=LoraConfig(rank=8, alpha=16, init_seed=1), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=1), steps=3, prompts_per_step=2, group_size=4, max_tokens=12, seed=1,
        max_staleness=1,
    )
    async with clora.Runtime(config, engine=tiny_engine) as rt:
        result = await rt.run(exp, env=ToyEnv(held_out=2))
    assert [s.step for s in result.steps] == [1, 2, 3]
    events = [e for e in read_events(tmp_path / "run") if e.get("tenant") == "async"]
    trained = [e for e in events if e["event"] == "trainer.step"]
    assert trained and all(int(age) <= 1 for e in trained for age in e["staleness"])
    assert not [e for e in events if e["event"] == "trainer.stale_data"]
    beside = [e for e in events if e["event"] == "sampler.adapter_loaded_beside"]
    retired = [e for e in events if e["event"] == "sampler.adapter_retired"]
    assert len(beside) == len(trained) and sorted(e["version"] for e in retired) == [e["previous_version"] for e in beside]
