"""Failures under Ray on a local cluster (marker ``ray``; ``make test-all``), tiny model, FakeEngine samplers.

- A sampler replica's Ray actor killed while tenants have requests in flight on it: its tenants fail over to the
  other replica, their in-flight requests are retried once, every tenant trains all its steps, and each tenant's
  final store (weights and Adam moments) equals a control run's in which nothing died.
- The driver of ``clora run FILE --cluster local`` killed with SIGKILL after a completed step, then run again with
  ``--resume``: every step is done exactly once, the run finishes, and the killed driver's Ray processes (its hosts,
  raylet, GCS) die with it; the resumed run starts a fresh local Ray instance of its own.
"""

from __future__ import annotations

import asyncio

import pytest

from clora import events as names
from clora.config import (
    ClusterConfig, EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, PlacementConfig, RuntimeConfig,
    TrainerConfig,
)
from clora.events import read_events
from clora.messages import Completion
from clora.testing import events_by_start

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

HALF = PlacementConfig(num_cpus=0.5)  # 2 CPUs in the test cluster: the trainer and two replicas fit
TENANTS = ("a", "b", "c", "d")
STEPS = 3


def _parity_script():
    """Reward 1 or 0 (ToyEnv's parity of the text) from the request's seed, which the tenant derives from its
    step, problem and episode: the same answers on any replica, in any order, so a run is reproducible.
    A closure: Ray copies it to the hosts by value."""
    odd = Completion(token_ids=[100, 101, 102], logprobs=[-1.0] * 3, text="a b", finish_reason="stop")  # reward 0
    even = Completion(token_ids=[100, 101], logprobs=[-1.0] * 2, text="ab", finish_reason="stop")  # reward 1

    def reply(request):
        return even if request.sampling.seed % 2 else odd

    return reply


def _experiment(name: str, seed: int) -> ExperimentConfig:
    return ExperimentConfig(name=name, steps=STEPS, prompts_per_step=2, group_size=4, max_tokens=4, seed=seed,
                            lora=LoraConfig(rank=4, alpha=8.0, init_seed=seed), optim=OptimConfig(lr=1e-2),
                            env=EnvConfig(held_out_size=1, max_turns=1))


def _states(run) -> dict[str, tuple[int, int, str]]:
    """Each tenant's last checkpoint: (step, adapter version, digest of its weights and Adam moments)."""
    from clora.checkpoint.format import read_manifest

    manifests = {t: read_manifest(run / "tenants" / t / "checkpoint") for t in TENANTS}
    return {t: (m.step, m.adapter_version, m.state_digest) for t, m in manifests.items()}


async def test_a_sampler_replica_killed_mid_run_its_tenants_fail_over_and_train_as_if_nothing_died(
        ray_cluster, tiny_model_dir, tmp_path):
    import clora.runtime
    from clora.testing import FakeEngine, ToyEnv

    model = ModelConfig(source=str(tiny_model_dir), max_model_len=512)
    trainer = TrainerConfig(num_threads=1)  # the remote trainer's threads: the same float reductions
    experiments = [_experiment(t, i) for i, t in enumerate(TENANTS)]

    def envs():
        return {t: ToyEnv(held_out=1) for t in TENANTS}

    # the control: the same experiments on a local pool of two engines, nothing dies
    control = tmp_path / "control"
    async with clora.runtime.Runtime(RuntimeConfig(model=model, trainer=trainer, run_dir=str(control)), console_level="critical",
                                     engine=[FakeEngine(_parity_script()) for _ in range(2)]) as rt:
        results = await rt.run_many(experiments, envs=envs())
    assert not any(isinstance(r, BaseException) for r in results.values()), results

    run = tmp_path / "ray"
    config = RuntimeConfig(
        model=model, trainer=trainer, run_dir=str(run),
        cluster=ClusterConfig(address="auto", sampler_replicas=2, sampler_placement=HALF, trainer_placement=HALF),
    )
    # each completion "decodes" for 0.5 s in the replica: a tenant's rollout is in flight most of its step
    async with clora.runtime.Runtime(config, console_level="critical",
                                     engine=FakeEngine(_parity_script(), decode_s=0.5)) as rt:
        pool = rt.sampler._cell._actor
        victim = pool.replicas[0]
        stepped: set[str] = set()
        killed = asyncio.get_running_loop().create_future()

        async def kill_when_busy() -> None:
            """Once every tenant has trained a step: the moment replica 0 has requests in flight, kill its
            Ray actor (its process dies; nothing in the driver is told)."""
            from clora.testing import until

            await until(lambda: len(stepped) == len(TENANTS) and victim.requests > 0, timeout=120)
            killed.set_result((sorted(victim.tenants), victim.requests))
            ray_cluster.kill(victim.ref._cell._actor.link.handle, no_restart=True)

        killer = asyncio.ensure_future(kill_when_busy())
        results = await rt.run_many(experiments, envs=envs(), on_step=lambda tenant, record: stepped.add(tenant))
        await killer
        assert pool.alive() == ["sampler-1"]
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    moved, in_flight = killed.result()
    assert len(moved) == 2 and in_flight > 0  # two tenants per replica; the kill came while it decoded

    log = list(read_events(run))
    # every tenant trained every step once, each step publishing the next version
    trained = sorted((e["tenant"], e["step"], e["adapter_version"]) for e in log if e["event"] == names.TENANT_STEP)
    assert trained == [(t, s, s) for t in TENANTS for s in range(1, STEPS + 1)]
    [failed] = [e for e in log if e["event"] == names.REPLICA_FAILED]
    assert (failed["replica"], failed["tenants"], failed["alive"]) == ("sampler-0", moved, ["sampler-1"])
    assert [e["role"] for e in log if e["event"] == names.CLUSTER_HOST_DIED] == ["sampler"]
    failovers = [e for e in log if e["event"] == names.FAILOVER]
    assert sorted((e["tenant"], e["from_replica"], e["to_replica"]) for e in failovers) == [
        (t, "sampler-0", "sampler-1") for t in moved]
    retried = [e for e in log if e["event"] == names.REQUEST_RETRIED]
    assert retried  # (requests sent there until the death was seen are retried too: more than in_flight)
    assert {(e["from_replica"], e["to_replica"]) for e in retried} == {("sampler-0", "sampler-1")}
    assert {e["tenant"] for e in retried} <= set(moved)
    # after the kill, the moved tenants sampled only on the survivor, at the versions they had published
    death = log.index(failed)
    late = [e for e in log[death:] if e["event"] == names.SAMPLE_DONE and e.get("tenant") in moved]
    assert late and {e["replica"] for e in late} == {1}
    # nothing of any tenant was disturbed beyond its own steps: its stores equal the control's bit for bit
    assert _states(run) == _states(control)
    assert {s[:2] for s in _states(run).values()} == {(STEPS, STEPS)}


# ---------------------------------------------------------------------------------------------- driver killed

# `clora run` itself (clora.cli.main), with one seam used: the runtime class the command starts is given a scripted
# FakeEngine (the CLI has no engine option: in production each replica starts its vLLM engine). Everything else is
# the command's own: the TOML, --cluster, --resume, checkpoints, the Ray hosts.
CLI_WITH_FAKE_ENGINE = """
import functools, sys
import clora.cli.run as cli_run
from clora.messages import Completion
from clora.testing import FakeEngine

def script():
    right = Completion(token_ids=[100, 101, 102], logprobs=[-1.0] * 3, text="<tool>Final Answer: 7</tool>",
                       finish_reason="stop")
    wrong = Completion(token_ids=[100, 103], logprobs=[-1.0] * 2, text="<tool>Final Answer: 3</tool>",
                       finish_reason="stop")
    return lambda request: right if request.sampling.seed % 2 else wrong  # reward 1 or 0, by the episode's seed

runtime_class = cli_run.load_runtime_class
cli_run.load_runtime_class = lambda: functools.partial(runtime_class(), engine=FakeEngine(script(), decode_s=0.3))

if __name__ == "__main__":
    from clora.cli.main import main
    sys.exit(main(sys.argv[1:]))
"""

RUN_TOML = """
run_dir = "{run}"
[model]
source = "{model}"
max_model_len = 512
[trainer]
num_threads = 1
[cluster]
sampler_placement = {{ num_cpus = 0.5 }}
trainer_placement = {{ num_cpus = 0.5 }}
start_timeout_s = 300
{experiments}
"""

EXPERIMENT_TOML = """
[[experiments]]
name = "{name}"
seed = {seed}
steps = {steps}
prompts_per_step = 1
group_size = 4
max_tokens = 8
checkpoint_every = 1
lora = {{ rank = 4, alpha = 8.0, init_seed = {seed} }}
env = {{ kind = "gsm8k", path = "{problems}", held_out_size = 1, max_turns = 1, examples = "none" }}
"""

DRIVER_STEPS = 5  # the kill comes once every tenant has a checkpoint of step >= 1


def _steps_done(run: list[dict], tenant: str) -> list[int]:
    return [e["step"] for e in run if e.get("tenant") == tenant
            and e["event"] in (names.TENANT_STEP, names.TENANT_STEP_SKIPPED)]


def _alive(pids) -> set[int]:
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.timeout(900)  # two drivers, each starting two Ray hosts: minutes on a loaded 2-core machine
def test_the_driver_killed_and_resumed_under_ray_does_every_step_once_and_leaves_no_actor_behind(
        ray_cluster, tiny_model_dir, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from clora.checkpoint.format import read_manifest

    root = Path(__file__).resolve().parents[1]
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {7 - i}?", "answer": "#### 7"}) + "\n"
                                for i in range(8)))
    run = tmp_path / "run"
    tenants = ("a", "b")
    experiments = "".join(EXPERIMENT_TOML.format(name=t, seed=i, steps=DRIVER_STEPS, problems=problems)
                          for i, t in enumerate(tenants))
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML.format(run=run, model=tiny_model_dir, experiments=experiments))
    child = tmp_path / "clora_cli.py"
    child.write_text(CLI_WITH_FAKE_ENGINE)
    address = ray_cluster.get_runtime_context().gcs_address  # the driver joins the test's cluster: host:port
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(root)}

    def start(*flags: str, log: str) -> subprocess.Popen:
        with (tmp_path / log).open("w") as out:
            return subprocess.Popen([sys.executable, str(child), "run", str(toml), "--cluster", address, *flags],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def hosts(run_events) -> set[int]:
        return {e["pid"] for e in run_events if e["event"] == names.CLUSTER_HOST_STARTED}

    first = start(log="first.log")
    try:
        deadline = time.monotonic() + 400
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step >= 1 for every tenant in time"
            runs = events_by_start(run)
            saved = {e["tenant"] for e in (runs[-1] if runs else [])
                     if e["event"] == names.CHECKPOINT_WRITTEN and e["step"] >= 1}
            if saved >= set(tenants):
                break
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)  # the driver alone: what it started must end without it
        first.wait(timeout=30)
    (killed,) = events_by_start(run)
    assert not [e for e in killed if e["event"] == names.TENANT_FINISHED], "killed too late: a tenant finished"
    old_hosts = hosts(killed)
    assert len(old_hosts) == 2  # the trainer and the sampler, each a Ray actor process of its own
    # Ray ends the actors of a driver that died (they are owned by its job): no host of the killed run survives
    deadline = time.monotonic() + 60
    while _alive(old_hosts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(old_hosts), "a Ray actor of the killed driver is still alive"
    at_kill = {}
    for tenant in tenants:
        manifest = read_manifest(run / "tenants" / tenant / "checkpoint")
        assert manifest.step >= 1 and max(_steps_done(killed, tenant)) - manifest.step <= 1  # the step in flight
        at_kill[tenant] = manifest

    second = start("--resume", log="second.log")
    try:
        second.wait(timeout=400)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    resumed = events_by_start(run)[-1]
    assert not hosts(resumed) & old_hosts and len(hosts(resumed)) == 2
    for tenant in tenants:
        manifest = at_kill[tenant]
        (back,) = [e for e in resumed if e["event"] == names.CHECKPOINT_RESUMED and e["tenant"] == tenant]
        # the remote trainer holds the checkpoint's store bit for bit, and goes on from its step and version
        assert (back["step"], back["adapter_version"], back["digest"]) == (
            manifest.step, manifest.adapter_version, manifest.state_digest)
        # every step once: those the checkpoint holds from the first driver, the rest from the second
        assert _steps_done(resumed, tenant) == list(range(manifest.step + 1, DRIVER_STEPS + 1)), tenant
        final = read_manifest(run / "tenants" / tenant / "checkpoint")
        trained = [e for run_events in (killed, resumed) for e in run_events
                   if e["event"] == names.TENANT_STEP and e["tenant"] == tenant and
                   (run_events is resumed or e["step"] <= manifest.step)]
        assert final.step == DRIVER_STEPS and final.adapter_version == len(trained) > 0
    assert {e["tenant"] for e in resumed if e["event"] == names.TENANT_FINISHED} == set(tenants)
