"""clora.testing itself: the fake engine's replies and records, ToyEnv, event capture, until, tiny data."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from actors import ActorSystem
from clora import events
from clora.config import EngineConfig, ModelConfig
from clora.errors import AdapterMismatchError, ConfigError, EngineDeadError, PromptTooLongError
from clora.messages import Completion, LoadAdapter, RegisterAdapter, SampleRequest, SamplingSpec
from clora.sampler.actor import SamplerActor
from clora.sampler.adapter_names import adapter_name, parse_adapter_name
from clora.testing import (
    Events,
    FakeEngine,
    ToyEnv,
    assert_same_state,
    capture_events,
    char_sum_reward,
    make_data,
    parity_reward,
    store_state,
    until,
    with_nonfinite,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """One token per character: its code point."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def _spec(max_tokens: int = 16, n: int = 1) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, n=n)


# ----------------------------------------------------------------------------- replies


async def test_text_replies_are_tokenized_ended_and_cut_at_max_tokens():
    engine = FakeEngine(["ab", "abcdef"], tokenizer=CharTokenizer(), eos_token_id=2)
    first = (await engine.generate([1], _spec(max_tokens=4), None)).completions[0]
    assert (first.token_ids, first.text, first.finish_reason) == ([97, 98, 2], "ab", "stop")
    cut = (await engine.generate([1], _spec(max_tokens=4), None)).completions[0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == ([97, 98, 99, 100], "abcdef", "length")
    again = (await engine.generate([1], _spec(max_tokens=4), None)).completions[0]
    assert again == cut  # the last reply repeats
    # log-probs: one per token, negative, a fixed function of token and position
    assert len(first.logprobs) == 3 and all(-1.0 <= lp < 0 for lp in first.logprobs)
    assert first.logprobs[:2] == cut.logprobs[:2] and len(set(cut.logprobs)) > 1
    assert engine.completions == [first, cut, again]


async def test_a_stop_token_ends_a_text_reply_and_is_kept_like_vllm_keeps_it():
    engine = FakeEngine(["abcdef"], tokenizer=CharTokenizer(), eos_token_id=2)
    spec = SamplingSpec(max_tokens=16, stop_token_ids=(99, 101))
    out = (await engine.generate([1], spec, None)).completions[0]
    assert (out.token_ids, out.finish_reason) == ([97, 98, 99], "stop")
    with pytest.raises(ConfigError, match="sampling.stop_token_ids"):
        SamplingSpec(stop_token_ids=(-1,))


async def test_a_script_function_sees_tenant_version_and_repeats_and_may_be_async():
    seen = []

    async def script(request):
        seen.append((request.index, request.tenant, request.version, request.repeat, request.lora_id))
        await asyncio.sleep(0)
        return Completion(token_ids=[7] * (request.repeat + 1), logprobs=[-0.5] * (request.repeat + 1), text="x",
                          finish_reason="stop")

    engine = FakeEngine(script)
    out = await engine.generate([1, 2], _spec(n=3), (adapter_name("t", 5, 2), 5, Path("p")))
    assert [len(c.token_ids) for c in out.completions] == [1, 2, 3]
    await engine.generate([1, 2], _spec(), (adapter_name("t", 5, 3), 5, Path("p")))  # a new version: repeat 0
    await engine.generate([1, 2], _spec(), None)
    assert seen == [(0, "t", 2, 0, 5), (1, "t", 2, 1, 5), (2, "t", 2, 2, 5), (3, "t", 3, 0, 5), (4, None, None, 0, None)]
    assert [r.prompt_token_ids for r in engine.requests] == [[1, 2]] * 5


async def test_bad_scripts_and_prompts_fail_clearly():
    with pytest.raises(TypeError, match="non-empty sequence"):
        FakeEngine([])
    with pytest.raises(TypeError, match="no tokenizer"):
        await FakeEngine(["text"]).generate([1], _spec(), None)
    with pytest.raises(TypeError, match="str or a Completion"):
        await FakeEngine(lambda request: 42).generate([1], _spec(), None)
    with pytest.raises(PromptTooLongError, match="max_model_len 8"):
        await FakeEngine(["x"], tokenizer=CharTokenizer(), max_model_len=8).generate([1] * 5, _spec(max_tokens=4), None)


async def test_sample_fn_reports_the_given_versions_and_records_its_calls():
    engine = FakeEngine(["a", "bb"], tokenizer=CharTokenizer())
    sample = engine.sample_fn(tenant="t", versions=iter([3, 4]))
    first, v1 = await sample([1], _spec())
    second, v2 = await sample([1, 2], _spec())
    assert (first.text, v1, second.text, v2) == ("a", 3, "bb", 4)
    assert [(r.tenant, r.version, r.prompt_token_ids) for r in engine.requests] == [("t", 3, [1]), ("t", 4, [1, 2])]
    assert (await engine.sample_fn(versions=7)([1], _spec()))[1] == 7
    with pytest.raises(ValueError, match="n=2"):
        await sample([1], _spec(n=2))


# ----------------------------------------------------------------------------- adapters and failures


async def test_adapters_are_read_recorded_and_refused_on_demand(tiny_adapters):
    engine = FakeEngine(["x"], tokenizer=CharTokenizer())
    engine.refuse_load("t", 1, times=1, reason="injected")
    await engine.add_adapter(adapter_name("t", 2, 0), 2, tiny_adapters["a1"])
    with pytest.raises(AdapterMismatchError, match="injected"):
        await engine.reload_adapter(adapter_name("t", 2, 1), 2, tiny_adapters["a2"])
    await engine.reload_adapter(adapter_name("t", 2, 1), 2, tiny_adapters["a2"])  # refused once only
    (v0, v1) = engine.loaded("t")
    assert (v0.kind, v0.version, v1.kind, v1.version) == ("add", 0, "reload", 1)
    assert v1.config["r"] == 8 and v1.tensors and any("lora_B" in k for k in v1.tensors)
    assert engine.serving == {2: v1}
    with pytest.raises(AdapterMismatchError, match="rank 32 > engine.max_lora_rank 16"):
        await engine.add_adapter(adapter_name("u", 3, 0), 3, tiny_adapters["big"])
    engine.refuse_load("u", 0, reason="always")
    for _ in range(2):
        with pytest.raises(AdapterMismatchError, match="always"):
            await engine.add_adapter(adapter_name("u", 4, 0), 4, tiny_adapters["a3"])
    await engine.remove_adapter(2)
    assert engine.serving == {} and await engine.loaded_adapter_ids() == set()


async def test_a_killed_engine_refuses_everything():
    engine = FakeEngine(["x"], tokenizer=CharTokenizer())
    engine.kill("boom")
    assert engine.is_dead
    with pytest.raises(EngineDeadError, match="boom"):
        await engine.generate([1], _spec(), None)
    with pytest.raises(EngineDeadError):
        await engine.add_adapter(adapter_name("t", 2, 0), 2, Path("p"))


async def test_behind_a_sampler_actor_requests_carry_the_serving_version_and_peak_adapters_count():
    engine = FakeEngine(lambda request: f"{request.tenant}@{request.version}", tokenizer=CharTokenizer(),
                        read_adapters=False, decode_s=0.05)
    actor = SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(max_loras=2), shared_engine=engine)
    async with ActorSystem("t") as system:
        ref = await system.start(actor, name="sampler")
        for tenant in "abc":
            await ref.ask(RegisterAdapter(tenant=tenant, path="p", version=0))
        await ref.ask(LoadAdapter(tenant="a", path="p", version=1))
        results = await asyncio.gather(*(ref.ask(SampleRequest(tenant=t, prompt_token_ids=[1], sampling=_spec()))
                                         for t in "abc"))
    assert [r.completions[0].text for r in results] == ["a@1", "b@0", "c@0"]
    assert [r.adapter_version for r in results] == [1, 0, 0]
    assert engine.peak_adapters == 2  # max_loras: the third tenant waited


def test_adapter_names_round_trip():
    assert parse_adapter_name(adapter_name("my-tenant.v2", 17, 3)) == ("my-tenant.v2", 3)
    with pytest.raises(ValueError, match="not a sampler adapter name"):
        parse_adapter_name("__clora_base__")


# ----------------------------------------------------------------------------- ToyEnv


def test_toy_env_scores_text_records_draws_and_fails_after_n_starts():
    env = ToyEnv(held_out=3, fail_after=2, question="q{k}")
    problems = env.train_problems(random.Random(0), 2)
    assert env.drawn == [[p.id for p in problems]] and all(p.question == "q" + p.id[1:] for p in problems)
    assert [p.id for p in env.held_out()] == ["h0", "h1", "h2"]
    first, second, third = (env.start(p) for p in [*problems, problems[0]])
    assert first.initial_messages() == [{"role": "user", "content": problems[0].question}]
    assert (first.step("ab").reward, second.step("abc").reward) == (1.0, 0.0)
    assert first.step("abc").done and env.started == 3
    with pytest.raises(RuntimeError, match="broken on purpose"):
        third.step("ab")
    assert parity_reward("") == 1.0 and char_sum_reward("a") == (97 % 13) / 13
    assert ToyEnv(char_sum_reward).start(problems[0]).step("b").reward == (98 % 13) / 13


# ----------------------------------------------------------------------------- events and until


async def test_capture_events_collects_actor_events_and_restores_structlog():
    before = list(structlog.get_config()["processors"])
    with capture_events() as logs:
        async with ActorSystem("t") as system:
            engine = FakeEngine(["x"], read_adapters=False)
            actor = SamplerActor(Path("m"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=engine)
            ref = await system.start(actor, name="sampler")
            await ref.ask(RegisterAdapter(tenant="a", path="p", version=0))
    assert structlog.get_config()["processors"] == before
    assert isinstance(logs, Events) and logs.named(events.ADAPTER_REGISTERED, tenant="a").field("version") == [0]
    started_stopped = logs.named(events.ACTOR_STARTED, events.ACTOR_STOPPED, actor="sampler").field("event")
    assert started_stopped == [events.ACTOR_STARTED, events.ACTOR_STOPPED]


def test_events_filter_by_names_tenant_and_fields(tmp_path):
    rows = [{"event": "x", "tenant": "a", "step": 1}, {"event": "y", "tenant": "a", "step": 2},
            {"event": "x", "tenant": "b", "step": 1}, {"event": "x", "step": 3}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = Events.from_run(tmp_path)
    assert log == rows
    assert log.named("x").field("step") == [1, 1, 3]
    assert log.named("x", "y", tenant="a").field("step") == [1, 2]
    assert log.named(step=1).field("tenant") == ["a", "b"]
    assert log.named("z") == [] and len(log.named()) == 4
    with pytest.raises(KeyError):
        log.named("x").field("tenant")


async def test_until_waits_for_the_predicate_and_times_out():
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, flag.set)
    await until(flag.is_set, timeout=5)
    assert flag.is_set()
    with pytest.raises(TimeoutError):
        await until(lambda: False, timeout=0.05)


# ----------------------------------------------------------------------------- data


def test_make_data_is_seeded_and_shaped_for_training():
    data = make_data(5, seed=3, vocab=50)
    assert data == make_data(5, seed=3, vocab=50) and data != make_data(5, seed=4, vocab=50)
    for d in data:
        assert len(d.tokens) == len(d.loss_mask) == len(d.advantages) == len(d.sampler_logprobs)
        assert 12 <= len(d.tokens) <= 40 and max(d.tokens) < 50
        first = d.loss_mask.index(1.0)
        assert set(d.loss_mask[:first]) == {0.0} and set(d.loss_mask[first:]) == {1.0}
        assert len(set(d.advantages[first:])) == 1 and d.advantages[first] != 0.0


def test_with_nonfinite_spoils_only_the_last_datum():
    data = make_data(3, seed=1)
    nan = with_nonfinite(data, "nan_advantage")
    inf = with_nonfinite(data, "inf_sampler_logprob")
    assert nan[:2] == inf[:2] == data[:2]
    assert sum(math.isnan(a) for a in nan[-1].advantages) == 1
    assert inf[-1].sampler_logprobs.count(float("-inf")) == 1 and min(inf[-1].advantages) >= 0
    with pytest.raises(ValueError, match="how must be"):
        with_nonfinite(data, "zero")


def test_store_state_comparison_sees_one_changed_bit():
    import torch

    from clora.config import LoraConfig, OptimConfig
    from clora.trainer.store import AdapterStore

    store = AdapterStore.create("t", LoraConfig(rank=2, target_modules=("q_proj",)), OptimConfig(), {"q_proj": (8, 8)})
    before = store_state(store)
    assert_same_state(before, store_state(store))
    name = next(iter(store.params))
    store.params[name].view(-1)[0] = torch.nextafter(store.params[name].view(-1)[0], torch.tensor(1.0))
    with pytest.raises(AssertionError, match="params:"):
        assert_same_state(before, store_state(store))


def test_importing_clora_testing_loads_neither_vllm_nor_torch():
    code = ("import sys, clora.testing; from clora.testing import ToyEnv, until, capture_events, make_data; "
            "print(sorted({'vllm', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"
