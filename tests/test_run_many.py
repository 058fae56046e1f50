"""Runtime.run_many takes your own environments by experiment name, and tenant.started names the env used.

The real Runtime, sampler actor and trainer on the tiny model; the engine is clora.testing.FakeEngine.
"""

from __future__ import annotations

import pytest

import clora.runtime
from clora import events as names
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, RuntimeConfig
from clora.errors import ConfigError
from clora.events import read_events
from clora.messages import Completion
from clora.testing import FakeEngine, ToyEnv

pytestmark = pytest.mark.timeout(300)


class CountingEnv(ToyEnv):
    name = "counting"  # ToyEnv counts the episodes it starts


ANSWER = Completion(token_ids=[100, 101, 102], logprobs=[-1.0] * 3, text="a b", finish_reason="stop")


def _experiment(name: str) -> ExperimentConfig:
    return ExperimentConfig(name=name, steps=1, prompts_per_step=1, group_size=2, max_tokens=4,
                            lora=LoraConfig(rank=4, alpha=8.0), env=EnvConfig(held_out_size=1, max_turns=1))


async def test_run_many_runs_each_experiment_on_its_own_env(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir), max_model_len=512), run_dir=str(run))
    custom = CountingEnv(held_out=1)
    async with clora.runtime.Runtime(config, console_level="critical", engine=FakeEngine([ANSWER])) as rt:
        with pytest.raises(ConfigError, match="envs names 'typo', which is not an experiment here"):
            await rt.run_many([_experiment("mine")], envs={"typo": custom})
        results = await rt.run_many([_experiment("mine"), _experiment("builtin")], envs={"mine": custom})
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert custom.started == 1 * 2 + 2  # one problem x 2 episodes, and the held-out problem before and after
    started = {e["tenant"]: e["env"] for e in read_events(run) if e["event"] == names.TENANT_STARTED}
    assert started == {"mine": "counting", "builtin": "arithmetic"}
