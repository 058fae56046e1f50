"""Bad input at the engine level, on a real Runtime over the session's shared tiny vLLM engine.

A healthy tenant ("keep") is serving and has trained one step before the bad inputs arrive.
Each bad input (a rank above the engine's max, an unknown target module, a duplicate tenant
name while the first runs, a prompt longer than the context, train data longer than the
trainer accepts) gets one clear error before any engine or trainer call half-happens: no
adapter is registered or left behind in the engine, no trainer store is created, and "keep"
samples the same tokens at the same version afterwards.
"""

from __future__ import annotations

import pytest

import clora.runtime
from clora.config import (
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
)
from clora.errors import (
    AdapterMismatchError,
    DuplicateTenantError,
    PromptTooLongError,
    UnknownTenantError,
)
from clora.messages import Datum, SampleRequest, Snapshot

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

PROMPT = "What is 2 plus 3?"


@pytest.fixture(scope="module")
async def runtime(tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config, tmp_path_factory):
    """A Runtime whose sampler borrows the session's engine, with tenant "keep" at version 1."""
    config = RuntimeConfig(
        model=ModelConfig(source=str(tiny_model_dir), max_model_len=tiny_model_config.max_model_len),
        engine=tiny_engine_config,
        run_dir=str(tmp_path_factory.mktemp("bad-input-run")),
    )
    rt = clora.runtime.Runtime(config, console_level="critical", engine=tiny_engine)
    await rt.__aenter__()
    try:
        keep = await rt.tenant("keep", lora=LoraConfig(rank=8, init_seed=3), optim=OptimConfig(lr=1e-2))
        await keep.train_step([_datum(list(range(10, 30)))])
        await keep.publish()
        yield rt, keep
        await keep.close()
    finally:
        await rt.__aexit__(None, None, None)


def _datum(tokens: list[int]) -> Datum:
    n = len(tokens)
    return Datum(tokens=tokens, loss_mask=[0.0] + [1.0] * (n - 1), advantages=[0.0] + [1.0] * (n - 1),
                 sampler_logprobs=[0.0] + [-6.0] * (n - 1))


async def _greedy(handle) -> tuple[list[int], int]:
    result = await handle.sample(PROMPT, max_tokens=8, temperature=0.0)
    return result.completions[0].token_ids, result.adapter_version


async def _nothing_left_of(rt, tenant: str) -> None:
    """No trainer store and no engine adapter exist for ``tenant``."""
    with pytest.raises(UnknownTenantError):
        await rt.trainer.ask(Snapshot(tenant=tenant))
    with pytest.raises(UnknownTenantError):
        await rt.sampler.ask(SampleRequest(tenant=tenant, prompt_token_ids=[1, 2, 3]))


async def test_keep_serves_version_one(runtime):
    _, keep = runtime
    assert keep.version == 1 and (await _greedy(keep))[1] == 1


async def test_rank_above_the_engines_max_is_refused_at_tenant_add_time(runtime, tiny_engine):
    rt, keep = runtime
    before, loaded = await _greedy(keep), await tiny_engine.loaded_adapter_ids()
    with pytest.raises(AdapterMismatchError) as err:
        await rt.tenant("big", lora=LoraConfig(rank=32, alpha=64))
    assert str(err.value) == "lora.rank 32 of tenant 'big' exceeds engine.max_lora_rank 16"
    await _nothing_left_of(rt, "big")
    assert await tiny_engine.loaded_adapter_ids() == loaded and await _greedy(keep) == before
    with pytest.raises(AdapterMismatchError, match="exceeds engine.max_lora_rank 16"):
        await rt.run(ExperimentConfig(name="big2", lora=LoraConfig(rank=32)))
    await _nothing_left_of(rt, "big2")


async def test_unknown_target_module_is_refused_and_the_name_stays_free(runtime, tiny_engine):
    rt, keep = runtime
    before, loaded = await _greedy(keep), await tiny_engine.loaded_adapter_ids()
    with pytest.raises(AdapterMismatchError) as err:
        await rt.tenant("t", lora=LoraConfig(target_modules=("q_proj", "attn_proj")))
    assert str(err.value).startswith("target module 'attn_proj' does not exist in the base model")
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    await _nothing_left_of(rt, "t")
    assert await tiny_engine.loaded_adapter_ids() == loaded and await _greedy(keep) == before
    fixed = await rt.tenant("t", lora=LoraConfig(target_modules=("q_proj",)))  # nothing half-registered
    try:
        assert fixed.version == 0 and (await _greedy(fixed))[1] == 0
    finally:
        await fixed.close()
    assert await tiny_engine.loaded_adapter_ids() == loaded


async def test_duplicate_tenant_name_while_the_first_runs_is_refused(runtime, tiny_engine):
    rt, keep = runtime
    before, loaded = await _greedy(keep), await tiny_engine.loaded_adapter_ids()
    with pytest.raises(DuplicateTenantError) as err:
        await rt.tenant("keep")
    assert str(err.value) == "tenant 'keep' already exists in this runtime"
    with pytest.raises(DuplicateTenantError, match="tenant 'keep' already exists in this runtime"):
        await rt.run(ExperimentConfig(name="keep"))
    with pytest.raises(DuplicateTenantError, match=r"duplicate tenant names in \['x', 'x'\]"):
        await rt.run_many([ExperimentConfig(name="x"), ExperimentConfig(name="x")])
    await _nothing_left_of(rt, "x")
    assert await tiny_engine.loaded_adapter_ids() == loaded and await _greedy(keep) == before
    assert keep.version == 1


async def test_prompt_longer_than_the_context_fails_alone(runtime, tiny_engine):
    rt, keep = runtime
    before = await _greedy(keep)
    with pytest.raises(PromptTooLongError) as err:
        await keep.sample([5] * 1000, max_tokens=64)
    assert str(err.value) == "prompt of 1000 tokens + max_tokens 64 = 1064 exceeds the model's max_model_len 1024"
    with pytest.raises(PromptTooLongError, match="exceeds the model's max_model_len 1024"):
        await rt.sampler.ask(SampleRequest(tenant=None, prompt_token_ids=[5] * 1025))
    assert tiny_engine.num_unfinished_requests() == 0
    assert await _greedy(keep) == before


async def test_train_data_longer_than_the_trainer_accepts_is_refused_and_changes_nothing(runtime):
    rt, keep = runtime
    before = await _greedy(keep)
    snapshot = await rt.trainer.ask(Snapshot(tenant="keep"))
    with pytest.raises(PromptTooLongError) as err:
        await keep.train_step([_datum([5] * 1025)])
    assert str(err.value) == (
        "tenant 'keep': datum 0 has 1025 tokens; the trainer accepts at most 1024 "
        "(the base model's max_position_embeddings)"
    )
    after = await rt.trainer.ask(Snapshot(tenant="keep"))
    assert after.version == snapshot.version == 1
    assert all((after.tensors[k] == snapshot.tensors[k]).all() for k in snapshot.tensors)
    assert await _greedy(keep) == before
