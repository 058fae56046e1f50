"""Cancelling one tenant on the real tiny-model runtime, mid-rollout and mid-train.

Mid-rollout: the tenant's run task is cancelled while its requests decode in vLLM. Its requests
are aborted (none of its LoRA's requests remain in vLLM's output processor), its store never
moved past its last committed version, and a bystander tenant finishes every step.
Mid-train: a train step is cancelled while the trainer works on it. The trainer finishes the
step and its write-back before honouring the cancellation, so the store is the complete new
version: bit-identical to the same step run uncancelled on a twin tenant. Others go on.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import clora
from clora import events
from clora.config import (
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    RuntimeConfig,
)
from clora.events import TRAINER_STEP, TRAINER_TENANT_REMOVED
from clora.messages import Datum, Snapshot
from clora.testing import ToyEnv, char_sum_reward, until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
async def runtime(tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config, tmp_path_factory):
    """A Runtime whose sampler borrows the session's engine (cancelling aborts requests, never the engine)."""
    config = RuntimeConfig(
        model=ModelConfig(source=str(tiny_model_dir), max_model_len=tiny_model_config.max_model_len),
        engine=tiny_engine_config,
        run_dir=str(tmp_path_factory.mktemp("cancel-run")),
    )
    async with clora.Runtime(config, console_level="critical", engine=tiny_engine) as rt:
        yield rt


def _long_answers_env() -> ToyEnv:
    """One-turn answers scored by a graded reward, so groups spread and every step trains."""
    return ToyEnv(char_sum_reward, question="go on and on", held_out=1)


def _experiment(name: str, seed: int, steps: int, max_tokens: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, lora=LoraConfig(rank=4, alpha=8.0, init_seed=seed), env=EnvConfig(max_turns=1), steps=steps,
        prompts_per_step=1, group_size=4, max_tokens=max_tokens, seed=seed, advantage="grpo_no_std",
    )


def _vllm_requests_of(sampler, lora_prefix: str) -> list[str]:
    """Request ids vLLM's output processor still tracks for adapters named ``lora_prefix``..."""
    states = sampler.engine._llm.output_processor.request_states
    return [rid for rid, s in states.items() if (s.lora_name or "").startswith(lora_prefix)]


async def test_cancelling_a_tenant_mid_rollout_aborts_its_requests_and_keeps_its_store(runtime):
    rt = runtime
    sampler = rt.sampler._cell._actor
    bystander = asyncio.create_task(rt.run(_experiment("bystander", 1, steps=2, max_tokens=16), env=_long_answers_env()))
    victim = asyncio.create_task(rt.run(_experiment("victim", 2, steps=3, max_tokens=200), env=_long_answers_env()))
    log_path = rt.run_dir / "events.jsonl"

    def victim_decoding_in_step_2() -> bool:
        # The sampler counts a request in flight before vLLM has taken it (slot admission, adapter
        # load), so wait until vLLM itself holds the victim's requests; nothing yields before the cancel.
        steps = [e for e in events.read_events(log_path) if e["event"] == events.TENANT_STEP
                 and e.get("tenant") == "victim"] if log_path.exists() else []
        return len(steps) >= 1 and bool(_vllm_requests_of(sampler, "victim#"))

    await until(victim_decoding_in_step_2, timeout=240)
    assert sampler.in_flight("victim") > 0
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim

    # Its engine requests are gone (aborted, not left decoding) and its adapter is unloaded.
    assert _vllm_requests_of(sampler, "victim#") == []
    assert sampler.in_flight("victim") == 0 and sampler.serving_version("victim") is None
    # The bystander goes on to the end.
    result = await bystander
    assert [s.step for s in result.steps] == [1, 2]

    log = list(events.read_events(log_path))
    committed = [e["adapter_version"] for e in log if e["event"] == events.ADAPTER_PUBLISHED
                 and e["tenant"] == "victim"]
    (removed,) = [e for e in log if e["event"] == TRAINER_TENANT_REMOVED and e["tenant"] == "victim"]
    assert removed["version"] == committed[-1], "the store moved past its last committed version"
    (failed,) = [e for e in log if e["event"] == events.TENANT_FAILED and e["tenant"] == "victim"]
    assert "CancelledError" in failed["error"]
    assert sampler.lora_slots_free() == rt.config.engine.max_loras  # every engine LoRA slot was given back


def _datum(n_tokens: int, seed: int) -> Datum:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 200, (n_tokens,), generator=g).tolist()
    mask = [0.0] * 8 + [1.0] * (n_tokens - 8)
    return Datum(tokens=tokens, loss_mask=mask, advantages=[0.5 * m for m in mask],
                 sampler_logprobs=[-2.0 * m for m in mask])


async def test_cancelling_mid_train_leaves_the_complete_new_version_and_others_go_on(runtime):
    rt = runtime
    trainer = rt.trainer._cell._actor
    lora = LoraConfig(rank=4, alpha=8.0, init_seed=5)
    victim, twin, other = [await rt.tenant(n, lora=lora) for n in ("mt-victim", "mt-twin", "mt-other")]
    data = [_datum(400, seed=i) for i in range(16)]  # long enough that the step is caught mid-way
    before = await rt.trainer.ask(Snapshot(tenant="mt-victim"))

    step = asyncio.create_task(victim.train_step(data))
    await until(trainer.device_lock.locked, timeout=30)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step

    after = await rt.trainer.ask(Snapshot(tenant="mt-victim"))
    await twin.train_step(data)  # the same step, not cancelled
    reference = await rt.trainer.ask(Snapshot(tenant="mt-twin"))
    assert after.version in (before.version, before.version + 1)
    expected = reference if after.version == before.version + 1 else before
    assert all(torch.equal(after.tensors[k], expected.tensors[k]) for k in expected.tensors), "half-written store"
    assert after.version == before.version + 1  # the trainer finishes a started step before honouring the cancel

    # The trainer serves everyone afterwards, the victim included.
    assert (await other.train_step(data[:2])).version == 1
    assert (await victim.train_step(data[:2])).version == after.version + 1
    log = list(events.read_events(rt.run_dir))
    assert [e["version"] for e in log if e["event"] == TRAINER_STEP and e["tenant"] == "mt-victim"] == [1, 2]
    for handle in (victim, twin, other):
        await handle.close()
