"""Continual tenants on the real Runtime (sampler, trainer, sync actors, tiny model) with the FakeEngine:
pinned sampling during promotion, rollback seen by the next request, the learner, gates, and feedback
across a crash and a resume."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from safetensors.torch import load_file

from clora import events as names
from clora.config import EngineConfig, LossConfig, ModelConfig, RuntimeConfig
from clora.continual.learner import LearnerPolicy
from clora.continual.registry import Registry
from clora.errors import ConfigError, UnknownSampleError, UnknownVersionError
from clora.messages import Completion, TrainStep
from clora.runtime import Runtime
from clora.testing import Events, FakeEngine, FakeRequest, make_data, until

pytestmark = pytest.mark.timeout(180)

MANUAL = LearnerPolicy(auto=False)


def _config(tiny_model_dir, run) -> RuntimeConfig:
    return RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(run),
                         engine=EngineConfig(max_loras=2))


def _named(request: FakeRequest) -> Completion:
    """The completion names the engine adapter that served it (``t@v1#5@v1``)."""
    tokens = [10 + (request.version or 0), 20 + request.index % 7]
    return Completion(token_ids=tokens, logprobs=[-0.7, -1.1], text=request.adapter_name or "base",
                      finish_reason="stop")


async def _train_and_commit(t, seed: int, alias: str | None = "candidate") -> int:
    await t.train_step(make_data(2, seed))
    return (await t.commit(alias)).version


async def test_production_samples_come_from_the_production_version_even_while_it_is_promoted(tiny_model_dir, tmp_path):
    rng = random.Random(3)
    promoted = asyncio.Event()  # the early requests decode until the promotion is done: in flight during it

    async def slow(request: FakeRequest) -> Completion:
        await promoted.wait()
        await asyncio.sleep(rng.uniform(0, 0.03))
        return _named(request)

    engine = FakeEngine(slow)
    async with Runtime(_config(tiny_model_dir, tmp_path / "run"), console_level="critical", engine=engine) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        assert t.aliases() == {"production": 0}
        v1 = await _train_and_commit(t, 1)
        assert (v1, t.aliases()) == (1, {"production": 0, "candidate": 1})

        before, after = [], []

        async def ask(into: list, delay: float) -> None:
            await asyncio.sleep(delay)
            into.append(await t.sample([5, 6, 7], max_tokens=2, version="production"))

        early = [asyncio.ensure_future(ask(before, rng.uniform(0, 0.01))) for _ in range(12)]
        await until(lambda: len(engine.requests) >= 12)  # every early request has asked for production (v0)
        promotion = await t.promote(v1)  # while they all decode on v0
        assert before == []
        promoted.set()
        late = [asyncio.ensure_future(ask(after, 0)) for _ in range(8)]
        await asyncio.gather(*early, *late)
        candidate = await t.sample([5, 6, 7], max_tokens=2, version="candidate")
        explicit = await t.sample([5, 6, 7], max_tokens=2, version=0)

    assert promotion.promoted and (promotion.previous, promotion.version) == (0, 1)
    assert {r.adapter_version for r in before} == {0} and {r.adapter_version for r in after} == {1}
    for result in (*before, *after, candidate, explicit):  # the engine adapter that served it is the version named
        assert result.tenant == "t"
        assert result.completions[0].text.startswith(f"t@v{result.adapter_version}#")
        assert len(result.sample_ids) == 1
    assert candidate.adapter_version == 1 and explicit.adapter_version == 0
    assert engine.mixed == []
    assert engine.peak_adapters <= 2  # one engine LoRA slot per live version, within max_loras


async def test_rollback_is_seen_by_the_next_request_and_survives_a_restart(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    engine = FakeEngine(_named)
    with pytest.raises(ConfigError, match="continual=True"):
        async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=engine) as rt:
            plain = await rt.tenant("plain")
            await plain.sample([1, 2], max_tokens=2, version="production")
    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=engine) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        await t.promote(await _train_and_commit(t, 1))
        await t.promote(await _train_and_commit(t, 2))
        assert (await t.sample([1, 2], max_tokens=2, version="production")).adapter_version == 2
        assert await t.rollback() == 1
        assert (await t.sample([1, 2], max_tokens=2, version="production")).adapter_version == 1
        assert await t.rollback() == 0
        assert (await t.sample([1, 2], max_tokens=2, version="production")).adapter_version == 0
        with pytest.raises(UnknownVersionError, match="no earlier version"):
            await t.rollback()
        with pytest.raises(UnknownVersionError, match="no version 9"):
            await t.sample([1, 2], max_tokens=2, version=9)
        await t.promote(2)
    rolled = Events.from_run(run).named(names.CONTINUAL_ROLLED_BACK, tenant="t")
    assert [(e["from_version"], e["version"]) for e in rolled] == [(2, 1), (1, 0)]
    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=engine, resume=True) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        assert t.aliases() == {"production": 2, "candidate": 2} and t.version == 2
        assert await t.rollback() == 0  # the alias's history is kept on disk too
        assert [v.parent for v in t.versions()] == [None, 0, 1]
        again = await t.checkout(1)  # the learner goes back to v1: kept again as v3, its child
        assert (again.version, again.parent, t.version) == (3, 1, 3)
        registry = t.continual.registry
    v1, v3 = (load_file(str(registry.adapter_dir(v) / "adapter_model.safetensors")) for v in (1, 3))
    assert v1.keys() == v3.keys() and all(torch.equal(v1[k], v3[k]) for k in v1)


async def test_a_gate_promotes_only_a_better_version_and_the_event_carries_the_scores(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    quality = {0: 0.5, 1: 0.4, 2: 0.8}

    async def judge(tenant, version: int) -> float:
        result = await tenant.sample([3, 4], max_tokens=2, version=version, record=False)
        assert result.adapter_version == version
        return quality[version]

    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=FakeEngine(_named)) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        worse = await t.promote(await _train_and_commit(t, 1), gate=judge)
        better = await t.promote(await _train_and_commit(t, 2), gate=judge, margin=0.1)
        assert t.aliases()["production"] == 2
        assert t.versions()[2].scores == {"judge": 0.8}
    assert (worse.promoted, worse.score, worse.baseline) == (False, 0.4, 0.5)
    assert (better.promoted, better.previous, better.score, better.baseline) == (True, 0, 0.8, 0.5)
    events = Events.from_run(run)
    refused = events.named(names.CONTINUAL_PROMOTION_REFUSED, tenant="t")
    assert [(e["version"], e["score"], e["baseline"]) for e in refused] == [(1, 0.4, 0.5)]
    promoted = events.named(names.CONTINUAL_PROMOTED, tenant="t")
    assert [(e["version"], e["previous"], e["score"], e["margin"]) for e in promoted] == [(2, 0, 0.8, 0.1)]


async def test_a_held_out_gate_can_score_sampled_serving_several_episodes_per_problem(tiny_model_dir, tmp_path):
    from clora.config import EnvConfig
    from clora.continual.gate import score
    from clora.envs import make_env

    env = make_env(EnvConfig(kind="arithmetic", difficulty=1, held_out_size=3, seed=0))
    seen: list[FakeRequest] = []

    def answer(request: FakeRequest) -> Completion:
        seen.append(request)
        return Completion(token_ids=[5], logprobs=[-0.5], text="<tool>Final Answer: 0</tool>", finish_reason="stop")

    async with Runtime(_config(tiny_model_dir, tmp_path / "run"), console_level="critical",
                       engine=FakeEngine(answer)) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        greedy = await score(env, t, 0, max_tokens=8)
        assert [r.sampling.temperature for r in seen] == [0.0] * 3
        seen.clear()
        sampled = await score(env, t, 0, max_tokens=8, temperature=0.7, samples=4)
        assert len(seen) == 12 and {r.sampling.temperature for r in seen} == {0.7}
        assert len({r.sampling.seed for r in seen}) == 12  # every episode its own seed
        for bad in ({"samples": 0, "temperature": 0.7}, {"samples": 2, "temperature": 0.0},
                    {"samples": 1, "temperature": -1.0}):
            with pytest.raises(ConfigError, match="held-out gate needs samples"):
                await score(env, t, 0, **bad)
    assert 0.0 <= greedy <= 1.0 and 0.0 <= sampled <= 1.0


async def test_the_learner_trains_feedback_into_a_candidate_with_the_serving_versions_logprobs(
        tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    steps: list[TrainStep] = []
    policy = LearnerPolicy(min_batch=4, max_age_s=3600, loss=LossConfig(kind="ppo"))
    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=FakeEngine(_named)) as rt:
        ask = rt.ask

        async def spy(message):
            if isinstance(message, TrainStep):
                steps.append(message)
            return await ask(message)

        monkeypatch.setattr(rt, "ask", spy)
        t = await rt.tenant("t", continual=policy)
        served = await t.sample([5, 6, 7], n=4, max_tokens=2, version="production")
        with pytest.raises(UnknownSampleError, match="unknown sample id 'smp_nope'"):
            await t.feedback("smp_nope", 1.0)
        # late and out of order: 3 rewards are not a batch yet
        await t.feedback_many([(served.sample_ids[2], 0.0), (served.sample_ids[0], 1.0), (served.sample_ids[3], 0.0)])
        await asyncio.sleep(0.05)
        assert steps == [] and len(t.versions()) == 1
        await t.feedback(served.sample_ids[1], 1.0)  # the 4th: a step is due
        await until(lambda: len(t.versions()) == 2 or t.continual.learner_error is not None)
        assert t.continual.learner_error is None
        await t.continual.wait_learned()
        assert t.continual.pending() == []
    (step,) = steps
    by_tokens = {tuple(c.token_ids): c for c in served.completions}
    for datum in step.data:
        completion = by_tokens[tuple(datum.tokens[3:])]
        assert datum.sampler_version == 0 and datum.sampler_logprobs[3:] == completion.logprobs
    assert sorted(d.advantages[-1] for d in step.data) == [-0.5, -0.5, 0.5, 0.5]
    learned = Registry.load(run / "tenants" / "t" / "continual", "t")
    assert learned.aliases() == {"production": 0, "candidate": 1}
    assert (learned.get(1).parent, learned.get(1).data, sorted(learned.get(1).feedback)) == (0, 4, [0, 1, 2, 3])
    (event,) = Events.from_run(run).named(names.CONTINUAL_LEARNER_STEP, tenant="t")
    assert (event["version"], event["parent"], event["feedback"]) == (1, 0, 4)


async def test_feedback_is_neither_lost_nor_applied_twice_across_a_crash_and_a_resume(
        tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    engine = FakeEngine(_named)
    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=engine) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        served = await t.sample([5, 6, 7], n=6, max_tokens=2, version="production")
        ids = served.sample_ids
        await t.feedback_many([(ids[0], 1.0), (ids[1], 0.0)])
        assert (await t.learn()).version == 1  # applied: committed with version 1
        await t.feedback_many([(ids[2], 1.0), (ids[3], 0.0)])
        # the crash: the learner's step trains, but the process dies before its version is committed
        monkeypatch.setattr(Registry, "save", _crash)
        with pytest.raises(SystemError, match="crash"):
            await t.learn()
        monkeypatch.undo()
    async with Runtime(_config(tiny_model_dir, run), console_level="critical", engine=engine, resume=True) as rt:
        t = await rt.tenant("t", continual=MANUAL)
        assert t.version == 1  # the trainer state of the last committed version, not the lost step's
        assert [f.seq for f in t.continual.pending()] == [2, 3]  # accepted before the crash: pending again
        await t.feedback_many([(ids[4], 1.0), (ids[5], 0.0)])  # samples served before the crash get feedback
        await t.feedback(ids[2], 1.0)  # a client's retry of an accepted reward is not a second one
        info = await t.learn()
        assert (info.version, info.parent, sorted(info.feedback)) == (2, 1, [2, 3, 4, 5])
        assert await t.learn() is None
    registry = Registry.load(run / "tenants" / "t" / "continual", "t")
    trained = [seq for v in registry.versions() for seq in v.feedback]
    assert sorted(trained) == [0, 1, 2, 3, 4, 5]  # each accepted reward trained exactly once


def _crash(self) -> None:
    raise SystemError("crash before the registry commit")
