"""Load: 64 tenants on the tiny model at once, with bounded mailboxes, on the real engine.

Each tenant runs three RL steps (1 prompt x 2 samples, 4 tokens) plus its two held-out evals. Every
tenant must finish; every actor's mailbox stays within its capacity (read back from the
``actor.mailbox_stats`` events every actor logs when it ends); and the peak RSS of this process
tree (the test process and the vLLM engine processes, sampled every 0.25 s with psutil) stays
under a generous bound. The measured numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

import clora
from actors import events as actor_events
from clora import events
from clora.config import (
    EngineConfig,
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    RuntimeConfig,
    TrainerConfig,
)
from clora.testing import ToyEnv, char_sum_reward

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TENANTS = 64
STEPS = 3
RSS_BOUND_GIB = 12.0  # generous: the shared machine has 24 GiB; measured numbers are printed


def _tree_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a child that just exited
            pass
    return total


async def _sample_peak_rss(peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _tree_rss())
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def test_64_tenants_finish_with_bounded_mailboxes_and_memory(tmp_path):
    config = RuntimeConfig(
        model=ModelConfig(source="tiny", max_model_len=256),
        engine=EngineConfig(max_loras=8, max_cpu_loras=TENANTS + 8, max_lora_rank=8, max_num_seqs=64,
                            kv_cache_gib=0.5),
        trainer=TrainerConfig(queue_size=8),
        run_dir=str(tmp_path / "run"),
    )
    experiments = [
        ExperimentConfig(name=f"t{i:02d}", lora=LoraConfig(rank=4, alpha=8.0, init_seed=i), env=EnvConfig(max_turns=1),
                         steps=STEPS, prompts_per_step=1, group_size=2, max_tokens=4, seed=i)
        for i in range(TENANTS)
    ]
    peak, stop = [0], asyncio.Event()
    sampler = asyncio.create_task(_sample_peak_rss(peak, stop))
    started = time.perf_counter()
    try:
        async with clora.Runtime(config, console_level="critical") as rt:
            warm = time.perf_counter()
            envs = [ToyEnv(char_sum_reward, question="go", held_out=1) for _ in experiments]
            results = await asyncio.gather(*(rt.run(e, env=env) for e, env in zip(experiments, envs)),
                                           return_exceptions=True)
            ran_s = time.perf_counter() - warm
    finally:
        stop.set()
        await sampler
    total_s = time.perf_counter() - started
    peak_gib = peak[0] / 2**30

    failures = {e.name: r for e, r in zip(experiments, results) if isinstance(r, BaseException)}
    assert not failures, failures
    assert all([s.step for s in r.steps] == list(range(1, STEPS + 1)) for r in results)

    log = list(events.read_events(tmp_path / "run"))
    assert len({e["tenant"] for e in log if e["event"] == events.TENANT_FINISHED}) == TENANTS
    stats = {e["actor"]: e for e in log if e["event"] == actor_events.ACTOR_MAILBOX_STATS}
    assert {"sampler", "trainer", "sync"} <= stats.keys()
    assert sum(name.startswith("tenant:") for name in stats) == TENANTS
    for line in stats.values():
        assert 0 <= line["peak"] <= line["capacity"], line
        assert line["waiting_senders"] == 0 and line["depth"] == 0, line  # nothing left behind at stop
        assert line["processed"] >= 1, line
    assert stats["trainer"]["capacity"] == 8
    print(
        f"\n{TENANTS} tenants: runtime {total_s:.1f} s (tenants {ran_s:.1f} s); peak RSS of the process tree "
        f"{peak_gib:.2f} GiB; mailbox peaks: sampler {stats['sampler']['peak']}/{stats['sampler']['capacity']}, "
        f"trainer {stats['trainer']['peak']}/{stats['trainer']['capacity']}, "
        f"sync {stats['sync']['peak']}/{stats['sync']['capacity']}"
    )
    assert 0 < peak_gib < RSS_BOUND_GIB
