"""max_staleness end to end: the real Runtime, sampler, sync and trainer on the tiny model; the engine
is clora.testing.FakeEngine with random decode delays (it records which version each LoRA id held
while a request decoded, so a mixed sequence shows in ``engine.mixed``).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from rich.console import Console

import clora.runtime
from clora import events as names
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.events import read_events
from clora.messages import Completion, TrainStep
from clora.observe import summarize, summary_table
from clora.testing import FakeEngine, FakeRequest, ToyEnv, char_sum_reward, make_data

pytestmark = pytest.mark.timeout(300)

P, G = 2, 3  # prompts per step, group size


def experiment(k: int, *, steps: int = 4, policy: str = "drop") -> ExperimentConfig:
    return ExperimentConfig(
        name="t", seed=1, steps=steps, prompts_per_step=P, group_size=G, max_tokens=6, max_staleness=k,
        stale_policy=policy, lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=1), advantage="grpo_no_std", checkpoint_every=0,
    )


def completion(request: FakeRequest) -> Completion:
    rng = random.Random(request.sampling.seed)
    tokens = [rng.randrange(100, 150) for _ in range(rng.randint(1, request.sampling.max_tokens))]
    return Completion(token_ids=tokens, logprobs=[-1.0] * len(tokens), text=" ".join(map(str, tokens)),
                      finish_reason="length")


def delayed(seed: int):
    rng = random.Random(seed)

    async def script(request: FakeRequest) -> Completion:
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        return completion(request)

    return script


async def _run(tmp_path, tiny_model_dir, exp: ExperimentConfig, engine: FakeEngine, during=None):
    run = tmp_path / "run"
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir), max_model_len=512), run_dir=str(run))
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        if during is not None:
            during(rt)
        result = await rt.run(exp, env=ToyEnv(char_sum_reward, held_out=1))
    return result, list(read_events(run))


def _of(events, name):
    return [e for e in events if e["event"] == name and e.get("tenant") == "t"]


@pytest.mark.parametrize("k", [1, 2])
async def test_rollouts_run_ahead_within_the_bound_and_versions_never_mix(k, tiny_model_dir, tmp_path):
    engine = FakeEngine(delayed(k), max_model_len=512)
    result, events = await _run(tmp_path, tiny_model_dir, experiment(k, steps=5), engine)
    trained = _of(events, names.TRAINER_STEP)
    ages = [int(age) for e in trained for age, n in e["staleness"].items() for _ in range(n)]
    assert len(ages) == sum(e["sequences"] for e in trained) and max(ages) <= k
    assert max(ages) >= 1  # the next steps' rollouts did sample while a step trained
    assert _of(events, names.TRAINER_STALE_DATA) == []  # the tenant's pipeline kept the bound itself
    steps = _of(events, names.TENANT_STEP)
    assert [e["staleness"] for e in steps] == [e["staleness"] for e in trained]
    assert all(e["train/ratio_mean"] > 0 for e in steps)
    assert _of(events, names.TENANT_STARTED)[0]["max_staleness"] == k
    # every publish loaded beside the old version; every old version was unloaded once drained
    beside = _of(events, names.ADAPTER_LOADED_BESIDE)
    assert len(beside) == len(trained) and _of(events, names.ADAPTER_LOADED) == []
    retired = _of(events, names.ADAPTER_RETIRED)
    assert sorted(e["version"] for e in retired) == [e["previous_version"] for e in beside]
    assert events.index(retired[-1]) < events.index(_of(events, names.ADAPTER_REMOVED)[0])
    assert len(engine.removed) == len(beside) + 1 and engine.serving == {}  # + the last, when the tenant left
    assert engine.mixed == []
    assert all(r.version == int(r.adapter_name.rpartition("@v")[2]) for r in engine.requests)
    assert len(result.steps) == 5
    # clora events: the staleness of everything the tenant trained on
    (row,) = [r for r in summarize(events) if r.tenant == "t"]
    assert sum(row.staleness.values()) == len(ages) and max(row.staleness) == max(ages)
    console = Console(record=True, width=120)
    console.print(summary_table([row]))
    text = console.export_text()
    assert "staleness of the trained data" in text and row.staleness_text in text


async def test_k0_is_the_synchronous_loop(tiny_model_dir, tmp_path):
    engine = FakeEngine(delayed(0), max_model_len=512)
    result, events = await _run(tmp_path, tiny_model_dir, experiment(0), engine)
    trained = _of(events, names.TRAINER_STEP)
    assert [e["staleness"] for e in trained] == [{"0": e["sequences"]} for e in trained]
    assert all(s.trained for s in result.steps)
    # each step samples only with the version the previous step published, in place under one LoRA id
    sampled = [r for r in engine.requests if r.sampling.temperature > 0]
    assert [r.version for r in sampled] == [step for step in range(4) for _ in range(P * G)]
    reloads = [a for a in engine.adapters if a.kind == "reload"]
    assert len(reloads) == 4 and {a.lora_id for a in engine.adapters} == {reloads[0].lora_id}
    for name in (names.ADAPTER_LOADED_BESIDE, names.ADAPTER_RETIRED, names.TRAINER_STALE_DATA,
                 names.TENANT_RESAMPLED):
        assert _of(events, name) == [], name
    # the order of one step is unchanged: rollout, train, publish (in place), the step's line
    kinds = [e["event"] for e in events if e.get("tenant") == "t" and e["event"] in (
        names.TRAINER_STEP, names.ADAPTER_LOADED, names.TENANT_STEP)]
    assert kinds == [names.TRAINER_STEP, names.ADAPTER_LOADED, names.TENANT_STEP] * 4
    console = Console(record=True, width=120)
    console.print(summary_table(summarize(events)))
    assert "staleness" not in console.export_text()  # on-policy: the table is as before
    assert engine.mixed == []


def _bump_behind_the_tenants_back(engine: FakeEngine):
    """At the first training request, train the tenant's adapter once from outside (no bound): the
    step's data, sampled with version 0, then reach a trainer at version 1."""
    state = {"rt": None, "done": False}

    async def script(request: FakeRequest) -> Completion:
        if request.sampling.temperature > 0 and not state["done"]:
            state["done"] = True
            await state["rt"].trainer.ask(TrainStep(tenant="t", data=make_data(2, seed=5)))
        return completion(request)

    engine.script = script
    return lambda rt: state.update(rt=rt)


@pytest.mark.parametrize("policy", ["drop", "resample"])
async def test_the_trainer_enforces_the_bound_when_the_tenant_loop_does_not(policy, tiny_model_dir, tmp_path):
    engine = FakeEngine([""], max_model_len=512)
    during = _bump_behind_the_tenants_back(engine)
    result, events = await _run(tmp_path, tiny_model_dir, experiment(0, steps=2, policy=policy), engine, during)
    stale = _of(events, names.TRAINER_STALE_DATA)
    assert [(e["version"], e["stale"], e["of"], e["trained"]) for e in stale] == [(1, P * G, P * G, False)]
    trained = _of(events, names.TRAINER_STEP)
    assert all(set(e["staleness"]) <= {"0"} for e in trained)  # never past k = 0 ({}: the untagged bump)
    if policy == "drop":
        skipped = _of(events, names.TENANT_STEP_SKIPPED)
        assert [(e["step"], e["reason"]) for e in skipped] == [(1, "stale")]
        assert [s.trained for s in result.steps] == [False, True]
        sampled = [r.version for r in engine.requests if r.sampling.temperature > 0]
        assert sampled == [0] * (P * G) + [1] * (P * G)  # the trainer's version 1 served before step 2
    else:
        assert [e["step"] for e in _of(events, names.TENANT_RESAMPLED)] == [1]
        assert [s.trained for s in result.steps] == [True, True]
        sampled = [r.version for r in engine.requests if r.sampling.temperature > 0]
        assert sampled[: 2 * P * G] == [0] * (P * G) + [1] * (P * G)  # resampled with the trainer's version
