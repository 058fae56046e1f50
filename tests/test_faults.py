"""Fault isolation on the real Runtime, trainer and sync actor, with a scripted engine.

Each fault hits one tenant ("faulty") while two healthy tenants train beside it. The engine is a
scripted fake (deterministic completions per tenant), so a healthy tenant's training is a pure
function of its own config: its published adapter versions and its exported adapter must be
BIT-IDENTICAL to a control run in which the faulty tenant does not exist. The faulty tenant's
store must not move past its last committed version, and the event log must name the fault.

Faults: an env raising in ``step`` and in ``start`` (reset), a reward that is NaN, a string or
None, Calculator calls with garbage arguments, a step whose loss and gradients overflow to
inf/NaN, and a publish whose engine load fails.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

import clora.runtime
from clora import events
from clora.config import (
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainerConfig,
)
from clora.envs import Outcome, Problem
from clora.envs.tools import ToolUseEpisode
from clora.errors import EnvError, PublishError
from clora.events import TRAINER_STEP_REJECTED, TRAINER_TENANT_REMOVED
from clora.testing import Events, FakeEngine, FakeRequest

pytestmark = pytest.mark.timeout(180)

HEALTHY = ("good1", "good2")
FAULTY = "faulty"
STEPS = 3
FAULT_FROM_STEP = 2  # step 1 commits version 1 first, so "unchanged" means "still version 1"

# ----------------------------------------------------------------------------- scripted engine


def _answer(engine: FakeEngine, request: FakeRequest) -> str:
    """The k-th first (or follow-up) turn of a tenant gets completion k of its script."""
    earlier = [r.prompt_token_ids for r in engine.requests[: request.index] if r.tenant == request.tenant]
    follow_up = _is_follow_up(request.prompt_token_ids, earlier)
    k = sum(_is_follow_up(p, earlier[:i]) == follow_up for i, p in enumerate(earlier))
    return _script(request.tenant, k, follow_up)


GARBAGE_CALLS = (
    "<tool>Calculator: 9**9**9**9</tool>",
    "<tool>Calculator: 1/0</tool>",
    "<tool>Calculator: __import__('os').system('echo pwned')</tool>",
    "<tool>Calculator: " + "9" * 5000 + "</tool>",
    "<tool>Calculator: " + "(" * 400 + "1" + ")" * 400 + "</tool>",
)


def _script(tenant: str, k: int, follow_up: bool) -> str:
    """The ``k``-th first (or follow-up) turn of a tenant. Alternating lengths: parity rewards 1, 0, 1, ..."""
    if tenant.startswith("calc"):  # a garbage Calculator call, then a final answer right every other time
        if not follow_up:
            return GARBAGE_CALLS[k % len(GARBAGE_CALLS)]
        return "<tool>Final Answer: 4</tool>" if k % 2 == 0 else "<tool>Final Answer: 5</tool>"
    return "ab" if k % 2 == 0 else "abc"


# ----------------------------------------------------------------------------- envs with faults


class _Episode:
    def __init__(self, problem: Problem, fault: str | None, reward_scale: float, env: FaultyEnv) -> None:
        self.problem = problem
        self._fault = fault
        self._scale = reward_scale
        self._env = env

    def initial_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.problem.question}]

    def step(self, assistant_text: str) -> Outcome:
        reward = float(len(assistant_text) % 2 == 0)
        if self._fault == "step_raises":
            raise RuntimeError("the env's step is broken on purpose")
        if self._fault == "step_raises_once" and self._env.raises_left:
            self._env.raises_left -= 1
            raise RuntimeError("the env's step fails once")
        if self._fault == "step_hangs":
            time.sleep(3.0)  # a hung tool (it returns eventually, so no thread outlives the test session)
        if self._fault == "reward_nan":
            return Outcome(done=True, reward=math.nan)
        if self._fault == "reward_str":
            return Outcome(done=True, reward="1.0")  # type: ignore[arg-type]
        if self._fault == "reward_none":
            return Outcome(done=True, reward=None)  # type: ignore[arg-type]
        return Outcome(done=True, reward=reward * self._scale)


class FaultyEnv:
    """Parity rewards; from training step ``FAULT_FROM_STEP`` on, ``fault`` strikes (None: healthy)."""

    name = "faulty"
    stop_sequences: tuple[str, ...] = ()

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault
        self._draws = 0
        self.raises_left = 1  # step_raises_once

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        self._draws += 1
        return [Problem(id=f"s{self._draws}-{i}", question=f"question {rng.randrange(1000)}", answer="4")
                for i in range(n)]

    def held_out(self) -> list[Problem]:
        return [Problem(id="h0", question="held out", answer="4")]

    def start(self, problem: Problem):
        active = self._draws >= FAULT_FROM_STEP and problem.id.startswith("s")
        if active and self.fault == "start_raises":
            raise RuntimeError("the env's reset is broken on purpose")
        if self.fault == "calculator_garbage":
            return ToolUseEpisode(problem, few_shot=False)
        # 3e38 fits float32 (max 3.4e38); the loss summed over tokens overflows to inf
        scale = 3e38 if active and self.fault == "nonfinite_grad" else 1.0
        return _Episode(problem, self.fault if active else None, scale, self)


def _experiment(name: str, seed: int, *, max_turns: int = 1) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, lora=LoraConfig(rank=4, alpha=8.0, init_seed=seed), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=max_turns), steps=STEPS, prompts_per_step=1, group_size=2, max_tokens=8,
        seed=seed, advantage="grpo_no_std",
    )


class RunRecord:
    def __init__(self, results, engine: FakeEngine, run_dir: Path) -> None:
        self.results = results
        tenants = {a.tenant for a in engine.adapters}
        # tenant -> [(version, tensors)]: exactly what the engine would serve
        self.published = {t: [(a.version, a.tensors) for a in engine.loaded(t)] for t in tenants}
        self.prompts = {t: [r.prompt_token_ids for r in engine.requests if r.tenant == t] for t in tenants}
        self.events = Events.from_run(run_dir)
        self.run_dir = run_dir

    def exported(self, tenant: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / "tenants" / tenant / "adapter" / "adapter_model.safetensors"))

    def of(self, event: str, tenant: str) -> Events:
        return self.events.named(event, tenant=tenant)


async def _run(
    model_dir: Path, run_dir: Path, fault: str | None, fail_load=frozenset(), trainer: TrainerConfig | None = None,
    fail_load_once=frozenset(), **faulty_changes,
) -> RunRecord:
    """Two healthy tenants and, with ``fault``, a faulty one (its ExperimentConfig changed by ``faulty_changes``).
    ``fail_load`` / ``fail_load_once``: (tenant, version) pairs whose engine load fails always / once."""
    experiments = [_experiment(name, seed) for seed, name in enumerate(HEALTHY, start=1)]
    envs = {name: FaultyEnv() for name in HEALTHY}
    if fault is not None:
        name = "calc" if fault == "calculator_garbage" else FAULTY
        experiments.append(msgspec.structs.replace(_experiment(name, 7, max_turns=2), **faulty_changes))
        envs[name] = FaultyEnv(fault)
    config = RuntimeConfig(model=ModelConfig(source=str(model_dir)), trainer=trainer or TrainerConfig(),
                           run_dir=str(run_dir))
    engine = FakeEngine(lambda request: _answer(engine, request), tokenizer=_tokenizer(model_dir))
    for tenant, version in fail_load:
        engine.refuse_load(tenant, version, reason="injected load failure")
    for tenant, version in fail_load_once:
        engine.refuse_load(tenant, version, times=1, reason="injected load failure, once")
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        outcomes = await asyncio.gather(*(rt.run(e, env=envs[e.name]) for e in experiments), return_exceptions=True)
    return RunRecord(dict(zip([e.name for e in experiments], outcomes)), engine, run_dir)


@pytest.fixture(scope="module")
async def control(tiny_model_dir, tmp_path_factory) -> RunRecord:
    """The healthy tenants alone: what they must end up with whatever happens to a neighbour."""
    return await _run(tiny_model_dir, tmp_path_factory.mktemp("control"), fault=None)


def _assert_healthy_tenants_bit_identical(run: RunRecord, control: RunRecord) -> None:
    for name in HEALTHY:
        result = run.results[name]
        assert not isinstance(result, BaseException), f"{name} failed: {result!r}"
        assert [s.adapter_version for s in result.steps] == [1, 2, 3]
        assert [v for v, _ in run.published[name]] == [v for v, _ in control.published[name]] == [0, 1, 2, 3]
        for (_, got), (_, want) in zip(run.published[name], control.published[name], strict=True):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got), f"{name}: a published version differs"
        exported, reference = run.exported(name), control.exported(name)
        assert all(torch.equal(exported[k], reference[k]) for k in reference), f"{name}: exported adapter differs"


def test_control_run_trains_every_step(control):
    """The healthy tenants really train (so bit-identity below is not trivially about frozen weights)."""
    first, last = (dict(control.published["good1"][i][1]) for i in (0, -1))
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert not any(torch.equal(control.exported("good1")[k], control.exported("good2")[k])
                   for k in first if "lora_B" in k)


@pytest.mark.parametrize(
    ("fault", "error_type", "reason"),
    [
        ("step_raises", EnvError, "env step raised on problem s2-0: RuntimeError: the env's step is broken on purpose"),
        ("start_raises", EnvError, "could not start problem s2-0: the env's reset is broken on purpose"),
        ("reward_nan", EnvError, "non-finite reward nan for problem s2-0"),
        ("reward_str", EnvError, "reward '1.0' (str) for problem s2-0"),
        ("reward_none", EnvError, "reward None (NoneType) for problem s2-0"),
    ],
)
async def test_an_env_fault_fails_only_its_tenant(fault, error_type, reason, control, tiny_model_dir, tmp_path):
    run = await _run(tiny_model_dir, tmp_path / "run", fault)

    _assert_healthy_tenants_bit_identical(run, control)
    outcome = run.results[FAULTY]
    assert isinstance(outcome, error_type) and reason in str(outcome)
    # The event log names the tenant and the reason.
    (failed,) = run.of(events.TENANT_FAILED, FAULTY)
    assert reason in failed["error"] and error_type.__name__ in failed["error"]
    # Step 1 was committed (trained and published as version 1); the fault in step 2 moved nothing.
    assert [v for v, _ in run.published[FAULTY]] == [0, 1]
    assert [e["adapter_version"] for e in run.of(events.TENANT_STEP, FAULTY)] == [1]
    (removed,) = run.of(TRAINER_TENANT_REMOVED, FAULTY)
    assert removed["version"] == 1


async def test_nonfinite_gradients_skip_only_that_step_of_that_tenant(control, tiny_model_dir, tmp_path):
    run = await _run(tiny_model_dir, tmp_path / "run", "nonfinite_grad")

    _assert_healthy_tenants_bit_identical(run, control)
    result = run.results[FAULTY]
    assert not isinstance(result, BaseException), result  # the tenant goes on; its bad steps are skipped
    assert [(s.trained, s.adapter_version) for s in result.steps] == [(True, 1), (False, 1), (False, 1)]
    rejected = run.of(TRAINER_STEP_REJECTED, FAULTY)
    assert len(rejected) == 2 and all(e["version"] == 1 and "non-finite" in e["error"] for e in rejected)
    skipped = run.of(events.TENANT_STEP_SKIPPED, FAULTY)
    assert [(e["step"], e["reason"]) for e in skipped] == [(2, "non-finite"), (3, "non-finite")]
    # The store stayed at its committed version 1, weights and all: the exported adapter IS version 1.
    assert [v for v, _ in run.published[FAULTY]] == [0, 1]
    exported, committed = run.exported(FAULTY), run.published[FAULTY][-1][1]
    assert exported.keys() == committed.keys() and all(torch.equal(exported[k], committed[k]) for k in exported)


async def test_nonfinite_gradients_in_a_fused_step_reject_only_that_tenant(tiny_model_dir, tmp_path):
    """With fusion on, the faulty tenant's step may share one forward/backward with healthy tenants:
    only its own request is rejected (fused numerics differ from unfused, so no bit-identity here)."""
    run = await _run(tiny_model_dir, tmp_path / "run", "nonfinite_grad", trainer=TrainerConfig(fuse_max=4))

    for name in HEALTHY:
        result = run.results[name]
        assert not isinstance(result, BaseException), result
        assert [(s.trained, s.adapter_version) for s in result.steps] == [(True, 1), (True, 2), (True, 3)]
        assert not run.of(TRAINER_STEP_REJECTED, name)
    result = run.results[FAULTY]
    assert [(s.trained, s.adapter_version) for s in result.steps] == [(True, 1), (False, 1), (False, 1)]
    assert len(run.of(TRAINER_STEP_REJECTED, FAULTY)) == 2
    exported, committed = run.exported(FAULTY), run.published[FAULTY][-1][1]
    assert all(torch.equal(exported[k], committed[k]) for k in exported)


async def test_a_failed_publish_fails_only_its_tenant_and_keeps_the_old_version_serving(
    control, tiny_model_dir, tmp_path
):
    run = await _run(tiny_model_dir, tmp_path / "run", "healthy-but-unpublishable", fail_load={(FAULTY, 2)})

    _assert_healthy_tenants_bit_identical(run, control)
    outcome = run.results[FAULTY]
    assert isinstance(outcome, PublishError) and "version 1 keeps serving" in str(outcome)
    (failed_publish,) = run.of(events.PUBLISH_FAILED, FAULTY)
    assert failed_publish["version"] == 2 and failed_publish["serving_version"] == 1
    assert "injected load failure" in failed_publish["error"]
    (failed,) = run.of(events.TENANT_FAILED, FAULTY)
    assert "PublishError" in failed["error"]
    # The engine never got version 2; the trainer had committed it (trained, not served).
    assert [v for v, _ in run.published[FAULTY]] == [0, 1]
    (removed,) = run.of(TRAINER_TENANT_REMOVED, FAULTY)
    assert removed["version"] == 2


async def test_calculator_garbage_is_a_tool_error_and_the_tenant_trains_on(control, tiny_model_dir, tmp_path):
    run = await _run(tiny_model_dir, tmp_path / "run", "calculator_garbage")

    _assert_healthy_tenants_bit_identical(run, control)
    result = run.results["calc"]
    assert not isinstance(result, BaseException), result
    assert [s.adapter_version for s in result.steps] == [1, 2, 3] and all(s.trained for s in result.steps)
    # Every second-turn prompt shows the model the Calculator's refusal, never a Python error.
    tokenizer = _tokenizer(tiny_model_dir)
    second_turns = [tokenizer.decode(p) for p in run.prompts["calc"] if _is_follow_up(p, run.prompts["calc"])]
    assert len(second_turns) == 1 + STEPS * 2 + 1  # eval, 3 steps x 2 episodes, eval
    refusals = {"Error: operator Pow is not allowed", "Error: division by zero", "Error: Call is not allowed",
                "Error: expression longer than 200 characters"}
    seen = set()
    for text in second_turns:
        tool_reply = text.split("Error:", 1)[-1]
        (refusal,) = [r for r in refusals if r in text]
        seen.add(refusal)
        assert "Traceback" not in tool_reply and "pwned" not in tool_reply
    assert seen == refusals
    assert not run.of(events.TENANT_FAILED, "calc")


def _is_follow_up(prompt: list[int], prompts: list[list[int]]) -> bool:
    return any(len(p) < len(prompt) and prompt[: len(p)] == p for p in prompts)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


async def test_a_hung_env_step_times_out_and_fails_only_its_tenant(control, tiny_model_dir, tmp_path):
    """The hung step blocks the faulty tenant's own thread, not the event loop: the healthy tenants
    train exactly as without a neighbour, and the faulty one fails at its deadline."""
    hung_env = EnvConfig(max_turns=2, step_timeout_s=1.0)  # generous: step 1's quick steps must not time out
    run = await _run(tiny_model_dir, tmp_path / "run", "step_hangs", env=hung_env)

    _assert_healthy_tenants_bit_identical(run, control)
    outcome = run.results[FAULTY]
    assert isinstance(outcome, EnvError) and "did not return within 1 s (env.step_timeout_s)" in str(outcome)
    (failed,) = run.of(events.TENANT_FAILED, FAULTY)
    assert "env step on problem s2-0 did not return within 1 s" in failed["error"]
    assert [v for v, _ in run.published[FAULTY]] == [0, 1]


async def test_retries_carry_a_tenant_over_a_failing_env_step_and_a_failing_publish(control, tiny_model_dir, tmp_path):
    run = await _run(tiny_model_dir, tmp_path / "run", "step_raises_once", fail_load_once={(FAULTY, 3)},
                     retries=1, retry_backoff_s=0.01)

    _assert_healthy_tenants_bit_identical(run, control)
    result = run.results[FAULTY]
    assert not isinstance(result, BaseException), result
    assert [(s.trained, s.adapter_version) for s in result.steps] == [(True, 1), (True, 2), (True, 3)]
    assert [v for v, _ in run.published[FAULTY]] == [0, 1, 2, 3]  # version 3 served after its retried publish
    retries = [(e["what"], e["step"], e["attempt"]) for e in run.of(events.TENANT_RETRY, FAULTY)]
    assert retries == [("rollout", 2, 1), ("publish", 3, 1)]
    errors = [e["error"] for e in run.of(events.TENANT_RETRY, FAULTY)]
    assert "the env's step fails once" in errors[0] and "injected load failure, once" in errors[1]
    assert not run.of(events.TENANT_FAILED, FAULTY)


async def test_without_retries_the_same_failing_step_ends_the_tenant(tiny_model_dir, tmp_path):
    run = await _run(tiny_model_dir, tmp_path / "run", "step_raises_once")
    assert isinstance(run.results[FAULTY], EnvError) and not run.of(events.TENANT_RETRY, FAULTY)
