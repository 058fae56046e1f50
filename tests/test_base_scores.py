"""The base model's held-out score is computed once per runtime and shared by the tenants whose version 0
(the pristine adapter, i.e. the base model) evaluates the same held-out set the same way; a failed or
cancelled computation is never shared."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

import clora.runtime
from clora import events
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.rl.accuracy import HeldOutScore
from clora.tenant.base_scores import BaseScores, base_score_key
from clora.testing import Events, FakeEngine

pytestmark = pytest.mark.timeout(300)


class SlowScore:
    """A score that takes a few loop turns to compute, so others ask for it meanwhile."""

    def __init__(self, correct: int, *, fail: bool = False) -> None:
        self.correct, self.fail, self.calls = correct, fail, 0

    async def __call__(self) -> HeldOutScore:
        self.calls += 1
        for _ in range(5):
            await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("the engine refused the eval")
        return HeldOutScore(correct=self.correct, total=8)


async def test_tenants_asking_together_share_one_computation():
    scores, compute = BaseScores(), SlowScore(3)
    first, second, third = await asyncio.gather(
        scores.get(b"k", "a", compute), scores.get(b"k", "b", compute), scores.get(b"k", "c", compute)
    )
    assert compute.calls == 1
    assert first == second == third == (HeldOutScore(correct=3, total=8), "a")
    later = SlowScore(5)  # a tenant that starts after the score is known waits for nothing
    assert await scores.get(b"k", "d", later) == (HeldOutScore(correct=3, total=8), "a") and later.calls == 0
    other = SlowScore(6)
    assert await scores.get(b"other", "e", other) == (HeldOutScore(correct=6, total=8), "e") and other.calls == 1


async def test_a_failed_computation_is_not_shared_the_waiters_compute_their_own():
    scores, failing, working = BaseScores(), SlowScore(3, fail=True), SlowScore(4)
    owner = asyncio.create_task(scores.get(b"k", "a", failing))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(scores.get(b"k", "b", working))
    with pytest.raises(RuntimeError, match="refused"):
        await owner
    assert await waiter == (HeldOutScore(correct=4, total=8), "b")
    assert failing.calls == 1 and working.calls == 1


async def test_cancelling_the_computing_tenant_hands_the_work_on_and_a_cancelled_waiter_stays_cancelled():
    scores, first, second = BaseScores(), SlowScore(3), SlowScore(4)
    owner = asyncio.create_task(scores.get(b"k", "a", first))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(scores.get(b"k", "b", second))
    never = SlowScore(7)
    quitter = asyncio.create_task(scores.get(b"k", "c", never))
    await asyncio.sleep(0)
    owner.cancel()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert await waiter == (HeldOutScore(correct=4, total=8), "b") and second.calls == 1 and never.calls == 0


def test_the_key_is_the_env_and_the_evaluation_settings_not_the_training_recipe():
    base = ExperimentConfig(name="a", env=EnvConfig(difficulty=1, held_out_size=16, seed=7), max_tokens=32)
    same = ExperimentConfig(name="b", env=EnvConfig(difficulty=1, held_out_size=16, seed=7), max_tokens=32,
                            optim=OptimConfig(lr=3e-3), lora=LoraConfig(rank=4, alpha=8.0), temperature=0.7, seed=3)
    assert base_score_key(base, 1024) == base_score_key(same, 1024)
    for other in (ExperimentConfig(name="c", env=EnvConfig(difficulty=1, held_out_size=16, seed=8), max_tokens=32),
                  ExperimentConfig(name="c", env=EnvConfig(difficulty=1, held_out_size=32, seed=7), max_tokens=32),
                  ExperimentConfig(name="c", env=EnvConfig(difficulty=0, held_out_size=16, seed=7), max_tokens=32),
                  ExperimentConfig(name="c", env=EnvConfig(difficulty=1, held_out_size=16, seed=7), max_tokens=16)):
        assert base_score_key(other, 1024) != base_score_key(base, 1024)
    assert base_score_key(base, 2048) != base_score_key(base, 1024)


async def test_a_runtimes_tenants_evaluate_the_base_once_per_held_out_set(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def reply(request) -> str:
        return "<tool>Final Answer: 7</tool>"

    def experiment(name: str, env_seed: int, lr: float) -> ExperimentConfig:
        return ExperimentConfig(
            name=name, lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=lr),
            env=EnvConfig(difficulty=0, held_out_size=6, seed=env_seed, max_turns=1),
            steps=1, prompts_per_step=1, group_size=2, max_tokens=8, checkpoint_every=0,
        )

    experiments = [experiment("a", 7, 1e-3), experiment("b", 7, 3e-3), experiment("c", 8, 1e-3)]
    engine = FakeEngine(reply, tokenizer=tokenizer)
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path))
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        results = await rt.run_many(experiments)
    greedy = [r for r in engine.requests if r.sampling.temperature == 0.0]
    # held-out set seed 7 once (a or b), seed 8 once (c), then every tenant's final evaluation: 6 problems each
    assert len(greedy) == 6 * (2 + 3)
    evals = {e["tenant"]: e for e in Events.from_run(tmp_path).named(events.TENANT_EVAL) if e["step"] == 0}
    assert evals["a"]["computed_by"] == evals["b"]["computed_by"] in {"a", "b"}
    assert evals["c"]["computed_by"] == "c"
    assert results["a"].accuracy_start == results["b"].accuracy_start
    finals = [e for e in Events.from_run(tmp_path).named(events.TENANT_EVAL) if e["step"] == 1]
    assert sorted(e["computed_by"] for e in finals) == ["a", "b", "c"]  # trained versions are never shared
