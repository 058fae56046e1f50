"""TenantActor checkpoints and resume on a real trainer (tiny model) with a scripted engine (no vLLM).

The fake engine answers deterministically from (prompt, adapter version, how often it was asked),
so an uninterrupted run and a run that stops and resumes must draw the same problems and end with
the same weights.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import torch

from actors import ActorSystem, Supervision
from clora import events
from clora.checkpoint.format import base_model_identity, has_checkpoint, read_checkpoint, read_manifest
from clora.config import EngineConfig, ExperimentConfig, EnvConfig, LoraConfig, ModelConfig, OptimConfig, TrainerConfig
from clora.errors import AdapterMismatchError, CheckpointError
from clora.messages import ExportStoreState, StoreState
from clora.rl.chat import ChatRenderer
from clora.sampler.actor import SamplerActor
from clora.sampler.sync import SyncActor
from clora.tenant.actor import RunExperiment, TenantActor
from clora.testing import FakeEngine, FakeRequest, ToyEnv, capture_events
from clora.trainer.actor import TrainerActor

pytestmark = pytest.mark.timeout(300)


def _answer(request: FakeRequest) -> str:
    """The k-th identical request (tenant, prompt, version) gets 1 + k % 3 characters: parity rewards
    vary within a group, and a resumed run (a fresh engine) answers exactly as the uninterrupted one."""
    return "x" * (1 + request.repeat % 3)


def _experiment(steps: int, **changes) -> ExperimentConfig:
    fields = dict(
        name="t", lora=LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), optim=OptimConfig(lr=1e-2),
        env=EnvConfig(max_turns=1), steps=steps, prompts_per_step=2, group_size=4, max_tokens=8, seed=3,
        checkpoint_every=1,
    )
    return ExperimentConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def renderer(tiny_model_dir) -> ChatRenderer:
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(str(tiny_model_dir)))


class Harness:
    def __init__(self, model_dir: Path, renderer: ChatRenderer, tmp: Path) -> None:
        self.model_dir, self.renderer, self.tmp = model_dir, renderer, tmp
        self.base = base_model_identity(model_dir)

    async def run(self, experiment: ExperimentConfig, folder: Path, *, resume: bool, env: ToyEnv | None = None,
                  stop_after_step: int | None = None, base=None):
        """Run the experiment; returns (result or None if stopped early, final store state)."""
        env = env or ToyEnv()
        reached = asyncio.Event()

        def on_step(tenant: str, record) -> None:
            if stop_after_step is not None and record.step >= stop_after_step:
                reached.set()

        async with ActorSystem("ck") as system:
            engine = FakeEngine(_answer, tokenizer=self.renderer.tokenizer, max_model_len=256)
            sampler = await system.start(
                SamplerActor(self.model_dir, ModelConfig(source=str(self.model_dir)), EngineConfig(),
                             shared_engine=engine), name="sampler",
            )
            trainer = await TrainerActor.start_in(system, self.model_dir, TrainerConfig(queue_size=4))
            sync = await system.start(SyncActor(trainer, sampler, publish_root=self.tmp / "publish"), name="sync")
            actor = TenantActor(
                experiment, env=env, renderer=self.renderer, sampler=sampler, trainer=trainer, sync=sync,
                max_model_len=256, on_step=on_step, checkpoint_dir=folder, base_model=base or self.base,
                resume=resume,
            )
            tenant = await system.start(actor, name="tenant:t", supervision=Supervision.ISOLATE)
            run = asyncio.ensure_future(tenant.ask(RunExperiment()))
            if stop_after_step is None:
                result = await run
            else:
                await asyncio.wait([run, asyncio.ensure_future(reached.wait())], return_when=asyncio.FIRST_COMPLETED)
                assert not run.done(), "the run ended before it could be stopped"
                result = None
            state: StoreState = await trainer.ask(ExportStoreState(tenant="t"))
            await system.stop(tenant, mode="abort")
            if not run.done():
                run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        return result, state


@pytest.fixture
def harness(tiny_model_dir, renderer, tmp_path) -> Harness:
    return Harness(tiny_model_dir, renderer, tmp_path)


async def test_a_resumed_run_draws_the_same_problems_and_ends_with_the_same_weights(harness, tmp_path):
    env_full = ToyEnv()
    full, full_state = await harness.run(_experiment(4), tmp_path / "full", resume=False, env=env_full)

    env_first, env_rest = ToyEnv(), ToyEnv()
    first, _ = await harness.run(_experiment(2), tmp_path / "split", resume=False, env=env_first)
    at_two = read_checkpoint(tmp_path / "split")
    with capture_events() as logs:
        rest, rest_state = await harness.run(_experiment(4), tmp_path / "split", resume=True, env=env_rest)

    assert env_first.drawn + env_rest.drawn == env_full.drawn and len(env_full.drawn) == 4
    assert [r.step for r in rest.steps] == [1, 2, 3, 4] and rest.steps[:2] == first.steps
    assert rest.resumed_from_step == 2 and full.resumed_from_step is None
    assert rest.accuracy_start == first.accuracy_start and rest.started_at == first.started_at
    assert [r.adapter_version for r in rest.steps] == [r.adapter_version for r in full.steps]
    assert any(r.trained for r in full.steps[2:]), "the steps after the resume point must train"
    for name in full_state.params:  # same data in the same order on the same CPU: the same bits
        assert torch.equal(rest_state.params[name], full_state.params[name]), name
        assert torch.equal(rest_state.exp_avg_sq[name], full_state.exp_avg_sq[name]), name
    assert (rest_state.version, rest_state.adam_step) == (full_state.version, full_state.adam_step)
    resumed = logs.named(events.CHECKPOINT_RESUMED)
    assert len(resumed) == 1 and resumed[0]["step"] == 2 and resumed[0]["digest"] == at_two.manifest.state_digest
    assert resumed[0]["adapter_version"] == at_two.manifest.adapter_version == first.steps[-1].adapter_version
    written = logs.named(events.CHECKPOINT_WRITTEN).field("step")
    assert written == [3, 4] and read_manifest(tmp_path / "split").step == 4


async def test_stopping_a_run_checkpoints_its_last_completed_step(harness, tmp_path):
    folder = tmp_path / "ck"
    with capture_events() as logs:
        result, state = await harness.run(_experiment(8, checkpoint_every=100), folder, resume=False,
                                          stop_after_step=2)
    assert result is None
    steps = logs.named(events.TENANT_STEP, events.TENANT_STEP_SKIPPED).field("step")
    written = logs.named(events.CHECKPOINT_WRITTEN)
    assert [e["step"] for e in written] == [0, max(steps)], "step 0 periodically, the last step on stop"
    assert {"tenant", "step", "adapter_version", "duration_s", "bytes", "path"} <= written[-1].keys()
    manifest = read_manifest(folder)
    assert manifest.step == max(steps) >= 2 and len(manifest.progress.records) == manifest.step
    assert manifest.adapter_version == state.version == written[-1]["adapter_version"]


async def test_resume_refuses_a_checkpoint_of_another_rank_or_base_model_and_unregisters(harness, tmp_path):
    folder = tmp_path / "ck"
    await harness.run(_experiment(1), folder, resume=False)
    other_rank = _experiment(2, lora=LoraConfig(rank=8, alpha=8.0, target_modules=("q_proj", "v_proj")))
    with pytest.raises(AdapterMismatchError, match="rank mismatch: checkpoint rank 4, tenant rank 8"):
        await harness.run(other_rank, folder, resume=True)
    other_targets = _experiment(2, lora=LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",)))
    with pytest.raises(AdapterMismatchError, match="target modules mismatch"):
        await harness.run(other_targets, folder, resume=True)
    other_base = msgspec.structs.replace(harness.base, name="bigger", hidden_size=harness.base.hidden_size * 2)
    with pytest.raises(AdapterMismatchError, match=r"base model mismatch \(hidden_size\).*'bigger'"):
        await harness.run(_experiment(2), folder, resume=True, base=other_base)
    assert read_manifest(folder).step == 1, "a refused resume leaves the checkpoint alone"


async def test_resume_refuses_a_truncated_checkpoint(harness, tmp_path):
    folder = tmp_path / "ck"
    await harness.run(_experiment(1), folder, resume=False)
    tensors = folder / read_manifest(folder).tensors_file
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        await harness.run(_experiment(2), folder, resume=True)


async def test_starting_fresh_deletes_an_old_checkpoint_and_checkpoint_every_zero_writes_none(harness, tmp_path):
    folder = tmp_path / "ck"
    await harness.run(_experiment(1), folder, resume=False)
    assert has_checkpoint(folder)
    result, _ = await harness.run(_experiment(1, checkpoint_every=0), folder, resume=False)
    assert result.resumed_from_step is None and not has_checkpoint(folder)



async def test_a_failing_checkpoint_write_fails_the_tenant_and_keeps_the_previous_checkpoint(
    harness, tmp_path, monkeypatch
):
    import errno

    import clora.tenant.checkpoints as tenant_module

    real = tenant_module.write_checkpoint

    def disk_full_after_step_one(folder, state, progress, base):
        if progress.step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, state, progress, base)

    monkeypatch.setattr(tenant_module, "write_checkpoint", disk_full_after_step_one)
    folder = tmp_path / "ck"
    with capture_events() as logs, pytest.raises(OSError, match="No space left"):
        await harness.run(_experiment(4), folder, resume=False)
    assert read_checkpoint(folder).manifest.step == 1
    failed = logs.named(events.CHECKPOINT_FAILED)
    assert len(failed) == 1 and "No space left" in failed[0]["error"]
    steps = logs.named(events.TENANT_STEP, events.TENANT_STEP_SKIPPED).field("step")
    assert max(steps) == 2, "the tenant stops before training past its last checkpointable step"


async def test_each_trained_step_is_published_and_checkpointed_from_its_own_reply(harness, tmp_path, monkeypatch):
    """No second trip to the trainer after a step: the TrainStep's reply carries the adapter the
    sync publishes and the store copy the checkpoint writes (timed as time/copy in trainer.step)."""
    from actors.ref import ActorRef

    asked = Counter()
    real_ask = ActorRef.ask

    async def counting_ask(self, message):
        asked[type(message).__name__] += 1
        return await real_ask(self, message)

    monkeypatch.setattr(ActorRef, "ask", counting_ask)
    with capture_events() as logs:
        result, state = await harness.run(_experiment(3), tmp_path / "ck", resume=False)
    trained = sum(r.trained for r in result.steps)
    skipped = len(result.steps) - trained
    assert trained >= 1 and asked["TrainStep"] == trained
    assert asked["Snapshot"] == 1  # the first publish only
    assert asked["ExportStoreState"] == 1 + skipped + 1  # step 0, each untrained step, the harness's own copy
    steps = logs.named(events.TRAINER_STEP)
    assert len(steps) == trained and all("time/copy" in e for e in steps)
    assert read_manifest(tmp_path / "ck").adapter_version == state.version == result.steps[-1].adapter_version
