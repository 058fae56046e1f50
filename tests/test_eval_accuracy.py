"""Held-out accuracy as a count with a 95% Wilson interval; every held-out problem is in flight at once;
the tenant's eval events and result carry the count and the interval."""

from __future__ import annotations

import asyncio

import pytest

from transformers import AutoTokenizer

import clora.runtime
from clora import events
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.envs import ArithmeticEnv
from clora.messages import Completion, SamplingSpec
from clora.rl.accuracy import Z_95, HeldOutScore, wilson_interval
from clora.rl.chat import ChatRenderer
from clora.rl.step import EpisodeSettings, evaluate
from clora.testing import Events, FakeEngine, ToyEnv

pytestmark = pytest.mark.timeout(300)


def test_wilson_interval_by_hand():
    # 7 of 16 at z = 1.96: p = 0.4375, z^2 = 3.8416, z^2/n = 0.2401, denominator 1.2401;
    # centre = (0.4375 + 0.12005) / 1.2401 = 0.449601; half = 1.96 / 1.2401 * sqrt(0.24609375/16 + 3.8416/1024)
    # = 1.580518 * sqrt(0.015380859 + 0.003751563) = 1.580518 * 0.138320 = 0.218617
    low, high = wilson_interval(7, 16, z=1.96)
    assert low == pytest.approx(0.449601 - 0.218617, abs=2e-6) and high == pytest.approx(0.449601 + 0.218617, abs=2e-6)
    # 0 of n: the lower end is 0, the upper end z^2 / (n + z^2); n of n mirrors it
    z2 = Z_95 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert Z_95 == pytest.approx(1.959964, abs=1e-6)
    # symmetric around 1/2 at half right; narrower with more problems
    low64, high64 = wilson_interval(32, 64)
    assert low64 + high64 == pytest.approx(1.0) and high64 - low64 < high - low
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in ((5, 4), (-1, 4), (0, -1)):
        with pytest.raises(ValueError, match="correct <= total"):
            wilson_interval(*bad)


def test_held_out_score_counts_and_rebuilds_from_an_accuracy():
    score = HeldOutScore(correct=7, total=16)
    assert score.accuracy == 0.4375 and score.interval == wilson_interval(7, 16)
    assert HeldOutScore(correct=0, total=0).accuracy == 0.0
    for total in (1, 3, 16, 64, 1000):
        for correct in range(0, total + 1, max(1, total // 7)):
            assert HeldOutScore.from_accuracy(correct / total, total) == HeldOutScore(correct=correct, total=total)
    with pytest.raises(ValueError):
        HeldOutScore(correct=3, total=2)


class CountingSampler:
    """Answers every prompt with the same Final Answer; counts how many requests are in flight at once."""

    def __init__(self, answer: str) -> None:
        self.text = f"<tool>Final Answer: {answer}</tool>"
        self.in_flight = self.most_in_flight = self.calls = 0

    async def __call__(self, prompt: list[int], spec: SamplingSpec) -> tuple[Completion, int]:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(3):  # the engine takes a while: other requests may arrive meanwhile
                await asyncio.sleep(0)
            return Completion(token_ids=[5, 6, 7], logprobs=[-1.0] * 3, text=self.text, finish_reason="stop"), 0
        finally:
            self.in_flight -= 1


async def test_evaluation_has_every_held_out_problem_in_flight_at_once(tiny_model_dir):
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    env = ArithmeticEnv(difficulty=0, seed=7, held_out_size=64)
    problems = env.held_out()
    sampler = CountingSampler("7")
    settings = EpisodeSettings(max_turns=2, max_model_len=4096, sampling=SamplingSpec(max_tokens=8, temperature=0.0))
    score = await evaluate(sampler, renderer, env, problems, settings)
    assert sampler.calls == len(problems) == 64
    assert sampler.most_in_flight == len(problems)  # not one after another, not in smaller batches
    assert (score.correct, score.total) == (sum(p.answer == "7" for p in problems), 64)
    assert 0 < score.correct < 64  # the count is of right answers, not of episodes
    # and per operation: every "7" answer counted under its problem's kind, every problem once
    kinds = {p.kind for p in problems}
    assert kinds == {"add", "subtract"} and set(score.by_kind) == kinds
    for kind, (correct, total) in score.by_kind.items():
        mine = [p for p in problems if p.kind == kind]
        assert (correct, total) == (sum(p.answer == "7" for p in mine), len(mine))


async def test_a_tenant_reports_its_held_out_count_and_interval(tiny_model_dir, tmp_path):
    exp = ExperimentConfig(
        name="counted", lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2), env=EnvConfig(max_turns=1),
        steps=1, prompts_per_step=1, group_size=2, max_tokens=8, advantage="grpo_no_std",
    )
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def reply(request) -> str:  # ToyEnv's parity reward: held-out "say 1" and "say 3" get an odd answer
        prompt = tokenizer.decode(request.prompt_token_ids)
        if "say " in prompt:
            return "abc" if ("say 1" in prompt or "say 3" in prompt) else "ab"
        return "ab" if request.repeat % 2 == 0 else "abc"  # training groups have spread

    async with clora.runtime.Runtime(config, console_level="critical",
                                     engine=FakeEngine(reply, tokenizer=tokenizer)) as rt:
        result = await rt.run(exp, env=ToyEnv(held_out=4))
    # 2 of the 4 held-out problems right, at each evaluation
    assert result.held_out == 4 and result.score_end == HeldOutScore(correct=2, total=4)
    assert result.score_start == HeldOutScore(correct=2, total=4)
    run = Events.from_run(tmp_path)
    evals = run.named(events.TENANT_EVAL)
    low, high = wilson_interval(2, 4)
    assert [(e["correct"], e["problems"], e["accuracy"]) for e in evals] == [(2, 4, 0.5), (2, 4, 0.5)]
    assert all((e["ci_low"], e["ci_high"]) == (round(low, 4), round(high, 4)) for e in evals)
    (finished,) = run.named(events.TENANT_FINISHED)
    assert (finished["problems"], finished["ci_low"], finished["ci_high"]) == (4, round(low, 4), round(high, 4))
