"""Fault isolation end to end on the real tiny-model runtime (vLLM-CPU engine, trainer, sync).

Six faulty tenants (env step raises, env reset raises, NaN reward, string reward, overflowing
rewards that make the gradients non-finite, and an adapter file the engine refuses to load) run
beside two healthy tenants on one warm runtime. Sampling is random here, so bit-identity with a
control run is shown with the scripted engine (tests/test_faults.py); this test shows the same
isolation on the real engine: the healthy tenants train every step and publish exactly one new
version per trained step, each fault is logged with its tenant and reason, no engine request is
left behind, and the runtime trains a new tenant afterwards.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

import clora
import clora.sampler.sync
from clora import events
from clora.config import (
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
)
from clora.envs import Outcome, Problem
from clora.errors import EnvError, PublishError
from clora.events import TRAINER_STEP_REJECTED, TRAINER_TENANT_REMOVED

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

FAULT_FROM_STEP = 2
CORRUPT_TENANT = "publish"


def _text_reward(text: str) -> float:
    """Different random texts almost surely get different rewards, so groups have signal."""
    return (sum(map(ord, text)) % 97) / 97


class _Episode:
    def __init__(self, problem: Problem, fault: str | None) -> None:
        self.problem = problem
        self._fault = fault

    def initial_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.problem.question}]

    def step(self, text: str) -> Outcome:
        if self._fault == "env_step":
            raise RuntimeError("env step broken on purpose")
        if self._fault == "reward_nan":
            return Outcome(done=True, reward=math.nan)
        if self._fault == "reward_str":
            return Outcome(done=True, reward="high")  # type: ignore[arg-type]
        if self._fault == "nonfinite":  # each reward fits float32; the group's mean overflows to inf
            return Outcome(done=True, reward=3e38 * (0.5 + 0.5 * _text_reward(text)))
        return Outcome(done=True, reward=_text_reward(text))


class FaultEnv:
    name = "fault"
    stop_sequences: tuple[str, ...] = ()

    def __init__(self, fault: str | None) -> None:
        self.fault = fault
        self.draws = 0

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        self.draws += 1
        return [Problem(id=f"s{self.draws}-{i}", question=f"tell me {rng.randrange(1000)}", answer="0")
                for i in range(n)]

    def held_out(self) -> list[Problem]:
        return [Problem(id="h0", question="say hi", answer="0")]

    def start(self, problem: Problem) -> _Episode:
        active = self.draws >= FAULT_FROM_STEP and problem.id.startswith("s")
        if active and self.fault == "env_reset":
            raise RuntimeError("env reset broken on purpose")
        return _Episode(problem, self.fault if active else None)


def _experiment(name: str, seed: int, steps: int = 2) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, lora=LoraConfig(rank=4, alpha=8.0, init_seed=seed), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=1), steps=steps, prompts_per_step=1, group_size=4, max_tokens=8, seed=seed,
        advantage="grpo_no_std",
    )


@pytest.fixture(scope="module")
async def runtime(tiny_engine, tiny_model_dir, tiny_model_config, tiny_engine_config, tmp_path_factory):
    """A Runtime whose sampler borrows the session's engine: no fault here may harm the engine itself."""
    config = RuntimeConfig(
        model=ModelConfig(source=str(tiny_model_dir), max_model_len=tiny_model_config.max_model_len),
        engine=tiny_engine_config,
        run_dir=str(tmp_path_factory.mktemp("faults-run")),
    )
    async with clora.Runtime(config, console_level="critical", engine=tiny_engine) as rt:
        yield rt


def _corrupt_later_versions(write):
    """Publish the tenant CORRUPT_TENANT's versions >= 2 as a truncated safetensors file."""

    def write_then_corrupt(snap, path):
        size = write(snap, path)
        if snap.tenant == CORRUPT_TENANT and snap.version >= 2:
            (path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
        return size

    return write_then_corrupt


async def test_each_fault_stays_with_its_tenant_on_the_real_engine(runtime, monkeypatch):
    rt = runtime
    monkeypatch.setattr(clora.sampler.sync, "_write_atomically", _corrupt_later_versions(clora.sampler.sync._write_atomically))
    healthy = {"h1": None, "h2": None}
    faulty = {"env_step": "env_step", "env_reset": "env_reset", "reward_nan": "reward_nan",
              "reward_str": "reward_str", "nonfinite": "nonfinite", CORRUPT_TENANT: None}
    plan = {**healthy, **faulty}
    experiments = {name: _experiment(name, seed) for seed, name in enumerate(plan, start=1)}
    outcomes = await asyncio.gather(*(rt.run(experiments[n], env=FaultEnv(plan[n])) for n in plan),
                                    return_exceptions=True)
    results = dict(zip(plan, outcomes))
    log = list(events.read_events(rt.run_dir))

    def of(event: str, tenant: str) -> list[dict]:
        return [e for e in log if e["event"] == event and e.get("tenant") == tenant]

    # Healthy tenants: every step ran; one published version per trained step, in order.
    for name in healthy:
        result = results[name]
        assert not isinstance(result, BaseException), f"{name}: {result!r}"
        assert [s.step for s in result.steps] == [1, 2]
        trained = sum(s.trained for s in result.steps)
        assert result.steps[-1].adapter_version == trained
        published = [e["adapter_version"] for e in of(events.ADAPTER_PUBLISHED, name)]
        assert published == list(range(trained + 1))
        assert not of(events.TENANT_FAILED, name) and not of(TRAINER_STEP_REJECTED, name)

    # Env faults: the tenant fails with a named event carrying the reason; step 1's version was its last.
    reasons = {
        "env_step": "env step raised on problem s2-0: RuntimeError: env step broken on purpose",
        "env_reset": "could not start problem s2-0: env reset broken on purpose",
        "reward_nan": "non-finite reward nan for problem s2-0",
        "reward_str": "reward 'high' (str) for problem s2-0",
    }
    for name, reason in reasons.items():
        assert isinstance(results[name], EnvError) and reason in str(results[name]), results[name]
        (failed,) = of(events.TENANT_FAILED, name)
        assert reason in failed["error"]
        steps = of(events.TENANT_STEP, name) + of(events.TENANT_STEP_SKIPPED, name)
        assert [e["step"] for e in steps] == [1]
        (removed,) = of(TRAINER_TENANT_REMOVED, name)
        assert removed["version"] == steps[0]["adapter_version"]  # the store never moved past it

    # Overflowing rewards: the step's advantages are not finite, so it is skipped before the trainer
    # (tests/test_faults.py covers gradients that overflow inside the trainer); the tenant finishes.
    result = results["nonfinite"]
    assert not isinstance(result, BaseException), result
    (skipped,) = of(events.TENANT_STEP_SKIPPED, "nonfinite")
    assert skipped["step"] == 2 and skipped["reason"] == "non-finite" and "non-finite advantages" in skipped["error"]
    assert result.steps[1].adapter_version == result.steps[0].adapter_version and not result.steps[1].trained
    (removed,) = of(TRAINER_TENANT_REMOVED, "nonfinite")
    assert removed["version"] == result.steps[0].adapter_version

    # Publish failure: the engine refused the corrupt file; version 1 kept serving; only that tenant failed.
    outcome = results[CORRUPT_TENANT]
    assert isinstance(outcome, PublishError) and "version 1 keeps serving" in str(outcome), outcome
    (failed_publish,) = of(events.PUBLISH_FAILED, CORRUPT_TENANT)
    assert failed_publish["version"] == 2 and failed_publish["serving_version"] == 1
    assert "vLLM refused adapter" in failed_publish["error"]
    (failed,) = of(events.TENANT_FAILED, CORRUPT_TENANT)
    assert "PublishError" in failed["error"]

    # Nothing is left in the engine, and the runtime still trains a newcomer.
    sampler = rt.sampler._cell._actor
    assert sampler.engine.num_unfinished_requests() == 0
    assert all(sampler.in_flight(name) == 0 and sampler.serving_version(name) is None for name in plan)
    monkeypatch.undo()
    after = await rt.run(_experiment("after", 99, steps=1), env=FaultEnv(None))
    assert [s.step for s in after.steps] == [1]
