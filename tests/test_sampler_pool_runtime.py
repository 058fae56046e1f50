"""A Runtime over several engines (``Runtime(engine=[e1, e2])``): a SamplerPool in front of one sampler per engine.

The real Runtime, samplers, sync actor and trainer on the tiny model; the engines are clora.testing.FakeEngine.
"""

from __future__ import annotations

import pytest

import clora.runtime
from clora import events as names
from clora.cluster.pool import SamplerPool
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, RuntimeConfig
from clora.events import read_events
from clora.messages import Completion
from clora.sampler.actor import SamplerActor
from clora.testing import FakeEngine, ToyEnv

pytestmark = pytest.mark.timeout(300)

ODD = Completion(token_ids=[100, 101, 102], logprobs=[-1.0] * 3, text="a b", finish_reason="stop")  # reward 0
EVEN = Completion(token_ids=[100, 101], logprobs=[-1.0] * 2, text="ab", finish_reason="stop")  # reward 1


def engine() -> FakeEngine:
    """Answers alternate between rewards 0 and 1 (ToyEnv's parity reward): every group has spread, every step
    trains and publishes."""
    return FakeEngine(lambda request: EVEN if request.index % 2 else ODD)


def run_many(rt, names, steps=1, **kwargs):
    return rt.run_many([_experiment(n, steps) for n in names], envs={n: ToyEnv(held_out=1) for n in names}, **kwargs)


def _experiment(name: str, steps: int = 1) -> ExperimentConfig:
    return ExperimentConfig(name=name, steps=steps, prompts_per_step=1, group_size=2, max_tokens=4,
                            lora=LoraConfig(rank=4, alpha=8.0), env=EnvConfig(held_out_size=1, max_turns=1))


def _config(tiny_model_dir, run) -> RuntimeConfig:
    return RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir), max_model_len=512), run_dir=str(run))


def _names(run) -> set[str]:
    """The run's event names, less the scheduler's (whether two tenants met at the trainer is timing)."""
    return {e["event"] for e in read_events(run) if not e["event"].startswith("scheduler.")}


async def test_two_replicas_run_tenants_end_to_end_with_the_events_of_one_plus_the_pools(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    async with clora.runtime.Runtime(_config(tiny_model_dir, one), console_level="critical",
                                     engine=[engine()]) as rt:  # a list of one: today's sampler
        assert isinstance(rt.sampler._cell._actor, SamplerActor)
        single = await run_many(rt, "ab")
    engines = [engine(), engine()]
    async with clora.runtime.Runtime(_config(tiny_model_dir, two), console_level="critical", engine=engines) as rt:
        assert isinstance(rt.sampler._cell._actor, SamplerPool)
        pooled = await run_many(rt, "ab")
        stats = await rt.engine_stats()
    for results in (single, pooled):
        assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert stats is None  # FakeEngines keep no statistics
    # one tenant per replica, and each replica saw only its tenant's requests (and base-model ones)
    served = [{r.tenant for r in e.requests} - {None} for e in engines]
    assert sorted(map(sorted, served)) == [["a"], ["b"]]
    assert {a.tenant for e in engines for a in e.adapters} == {"a", "b"}
    assert _names(two) == _names(one) | {names.REPLICA_PLACED}
    for run in (one, two):
        steps = [(e["tenant"], e["adapter_version"]) for e in read_events(run) if e["event"] == names.TENANT_STEP]
        assert sorted(steps) == [("a", 1), ("b", 1)]  # trained and published version 1


async def test_a_replica_killed_mid_run_its_tenants_finish_on_the_other(tiny_model_dir, tmp_path):
    engines = [engine(), engine()]

    def kill_after_first_step(tenant: str, record) -> None:
        if record.step == 1 and not engines[0].is_dead:
            engines[0].kill("killed mid-run by the test")

    async with clora.runtime.Runtime(_config(tiny_model_dir, tmp_path), console_level="critical",
                                     engine=engines) as rt:
        results = await run_many(rt, "ab", steps=2, on_step=kill_after_first_step)
        assert rt.sampler._cell._actor.alive() == ["sampler-1"]
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    log = list(read_events(tmp_path))
    steps = sorted((e["tenant"], e["step"]) for e in log if e["event"] == names.TENANT_STEP)
    assert steps == [(t, s) for t in "ab" for s in (1, 2)]
    [failed] = [e for e in log if e["event"] == names.REPLICA_FAILED]
    moved = [e for e in log if e["event"] == names.FAILOVER]
    assert [(e["from_replica"], e["to_replica"]) for e in moved] == [("sampler-0", "sampler-1")]
    assert moved[0]["tenant"] in failed["tenants"]
    # the moved tenant's newest version serves on the survivor
    final = {e["tenant"]: e["adapter_version"] for e in log if e["event"] == names.ADAPTER_PUBLISHED}
    assert max(a.version for a in engines[1].adapters if a.tenant == moved[0]["tenant"]) == final[moved[0]["tenant"]]
