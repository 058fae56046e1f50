"""ExperimentConfig.seed seeds an experiment end to end: the problems it draws and every rollout request
(one seed per step, problem, episode and turn). Two runs of one config ask the engine for the same
requests, so with a sampler that honours seeds they sample, score and train identically.

The real Runtime, sampler actor and trainer on the tiny model; the engine is clora.testing.FakeEngine
with a script whose completion is a function of the request's seed (as vLLM's seeded sampling is a
function of the seed and the logits).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from safetensors.torch import load_file

import clora.runtime
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.messages import Completion
from clora.testing import FakeEngine, ToyEnv, char_sum_reward

pytestmark = pytest.mark.timeout(300)


def experiment(name: str, seed: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, seed=seed, steps=2, prompts_per_step=2, group_size=3, max_tokens=6,
        lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2), env=EnvConfig(max_turns=1),
        advantage="grpo_no_std",
    )


def test_episode_settings_seed_each_step_and_evaluation_apart():
    from clora.rl.step import episode_settings

    exp = experiment("a", 3)
    seeds = {episode_settings(exp, 512, step=s, evaluation=e).sampling.seed for s in (1, 2) for e in (False, True)}
    assert None not in seeds and len(seeds) == 4
    assert episode_settings(exp, 512, step=1).sampling.seed == episode_settings(experiment("b", 3), 512, step=1).sampling.seed
    assert episode_settings(exp, 512, step=1).sampling.seed != episode_settings(experiment("c", 4), 512, step=1).sampling.seed
    assert episode_settings(exp, 512, step=1, evaluation=True).sampling.temperature == 0.0


def seeded(request) -> Completion:
    """A completion that depends on the request's seed only (an unseeded request gets a random one)."""
    rng = random.Random(request.sampling.seed) if request.sampling.seed is not None else random.Random()
    tokens = [rng.randrange(100, 150) for _ in range(rng.randint(1, request.sampling.max_tokens))]
    return Completion(token_ids=tokens, logprobs=[-1.0] * len(tokens), text=" ".join(map(str, tokens)),
                      finish_reason="length")


async def test_two_tenants_with_one_config_sample_and_train_identically(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir), max_model_len=512), run_dir=str(run))
    engine = FakeEngine(seeded, max_model_len=512)
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        results = await asyncio.gather(*(rt.run(experiment(name, seed), env=ToyEnv(char_sum_reward, held_out=1))
                                         for name, seed in (("a", 3), ("b", 3), ("c", 4))))
    seeds = {t: [r.sampling.seed for r in engine.requests if r.tenant == t] for t in "abc"}
    assert len(seeds["a"]) == 2 * 2 * 3 + 2 * 1  # 2 steps x 2 problems x 3 episodes, and 2 held-out evals
    assert None not in seeds["a"] and len(set(seeds["a"])) == len(seeds["a"])  # one seed per request
    assert sorted(seeds["a"]) == sorted(seeds["b"])
    assert not set(seeds["a"]) & set(seeds["c"])

    a, b, c = results
    assert [s.reward_mean for s in a.steps] == [s.reward_mean for s in b.steps]
    assert [s.reward_mean for s in a.steps] != [s.reward_mean for s in c.steps]
    assert any(s.trained for s in a.steps)
    weights = {t: load_file(str(run / "tenants" / t / "adapter" / "adapter_model.safetensors")) for t in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all((weights["a"][k] == weights["b"][k]).all() for k in weights["a"])  # bit-identical
    assert any((weights["a"][k] != weights["c"][k]).any() for k in weights["a"])


# ----------------------------------------------------------------------------- seeded requests on vLLM-CPU


def test_a_cpu_generator_survives_vllms_rewind_after_a_chunked_prefill():
    """vLLM rewinds a seeded request's generator with ``set_offset(get_offset() - 4)`` when it throws
    away the token sampled after a partial prefill chunk; a plain CPU generator raises there (and the
    engine dies), a rewindless copy samples the same and lets the rewind pass."""
    import torch

    from clora.sampler.cpu_seeds import RewindlessGenerator, rewindless

    plain = torch.Generator(device="cpu").manual_seed(11)
    with pytest.raises(RuntimeError, match="does not use offset"):
        plain.set_offset(plain.get_offset() - 4)
    copy = rewindless(plain)
    assert isinstance(copy, RewindlessGenerator) and rewindless(copy) is copy and rewindless(None) is None
    copy.set_offset(copy.get_offset() - 4)
    expected = torch.empty(8).exponential_(generator=plain)
    assert torch.equal(torch.empty(8).exponential_(generator=copy), expected)


def test_install_makes_the_generators_entering_vllms_input_batch_rewindless(monkeypatch):
    import types

    import torch
    from vllm.v1.worker.gpu_input_batch import InputBatch

    from clora.sampler import cpu_seeds

    added = []
    monkeypatch.setattr(InputBatch, "add_request", lambda self, request: added.append(request.generator) or 0)
    monkeypatch.setattr(cpu_seeds, "_installed", False)
    assert cpu_seeds.install() and cpu_seeds.install()  # idempotent: wrapped once
    request = types.SimpleNamespace(generator=torch.Generator(device="cpu").manual_seed(3))
    assert InputBatch.add_request(None, request) == 0
    InputBatch.add_request(None, types.SimpleNamespace(generator=None))
    assert isinstance(added[0], cpu_seeds.RewindlessGenerator) and request.generator is added[0]
    assert added[1] is None
    added[0].set_offset(added[0].get_offset() - 4)  # vLLM's rewind, now harmless
