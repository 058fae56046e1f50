"""How reproducible a seeded experiment is on the real engine (tiny model, fp32, vLLM-CPU).

One runtime runs the same config (seed 3) three times: alone, alone again, and next to another tenant
(seed 5) whose requests share its batches. Each run's env records every completion it scores; the
test reports how many completions two runs share and requires the alone/alone pair to agree. What
may still differ (float reductions that depend on the batch) is in docs/reliability.md#seeds.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from clora.config import (
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
)
from clora.envs import Outcome, Problem
from clora.runtime import Runtime
from clora.testing import ToyEnv, char_sum_reward

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


class RecordingEnv(ToyEnv):
    """ToyEnv with graded rewards (a group's rewards differ, so every step trains) that records every
    (draw, problem, text) it scores."""

    def __init__(self) -> None:
        super().__init__(char_sum_reward, held_out=1)
        self.seen: Counter[tuple[int, str, str]] = Counter()

    def start(self, problem: Problem):
        episode = super().start(problem)
        draw, step = len(self.drawn), episode.step

        def recording_step(text: str) -> Outcome:
            self.seen[(draw, problem.id, text)] += 1
            return step(text)

        episode.step = recording_step
        return episode


def _experiment(name: str, seed: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, seed=seed, steps=3, prompts_per_step=2, group_size=4, max_tokens=16, temperature=1.0,
        lora=LoraConfig(rank=8), optim=OptimConfig(lr=1e-2), env=EnvConfig(max_turns=1), advantage="grpo_no_std",
    )


def _shared(x: Counter, y: Counter) -> float:
    """The share of x's training completions that y sampled too (held-out episodes are greedy: left out)."""
    x, y = (Counter({k: n for k, n in c.items() if k[1] != HELD_OUT}) for c in (x, y))
    return sum((x & y).values()) / max(1, sum(x.values()))


HELD_OUT = "h0"  # the held-out problem


async def test_a_seeded_experiment_samples_the_same_when_run_again(tiny_engine, tiny_model_dir, tiny_engine_config,
                                                                   tmp_path):
    config = RuntimeConfig(
        model=ModelConfig(source=str(tiny_model_dir), max_model_len=512),
        engine=tiny_engine_config,  # the session's engine, borrowed
        run_dir=str(tmp_path / "run"),
    )
    envs = {name: RecordingEnv() for name in ("alone", "again", "mixed", "other")}
    async with Runtime(config, console_level="critical", engine=tiny_engine) as rt:
        alone = await rt.run(_experiment("alone", 3), env=envs["alone"])
        again = await rt.run(_experiment("again", 3), env=envs["again"])
        mixed, other = await asyncio.gather(rt.run(_experiment("mixed", 3), env=envs["mixed"]),
                                            rt.run(_experiment("other", 5), env=envs["other"]))
    total = sum(envs["alone"].seen.values())
    again_share = _shared(envs["alone"].seen, envs["again"].seen)
    mixed_share = _shared(envs["alone"].seen, envs["mixed"].seen)
    other_share = _shared(envs["alone"].seen, envs["other"].seen)
    print(f"\nshared training completions of {total - 2}: alone/again {again_share:.0%}, alone/mixed {mixed_share:.0%}, "
          f"alone/other seed {other_share:.0%}; rewards alone {[s.reward_mean for s in alone.steps]}, "
          f"again {[s.reward_mean for s in again.steps]}, mixed {[s.reward_mean for s in mixed.steps]}")
    assert total == 3 * 2 * 4 + 2  # 3 steps x 2 problems x 4 episodes, and 2 greedy held-out episodes
    assert all(s.trained for s in alone.steps)
    assert other_share == 0.0  # another seed samples other text
    assert again_share >= 0.9, f"a rerun alone shares only {again_share:.0%} of its completions"
