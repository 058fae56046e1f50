"""TrainerActor: messages, events, errors per tenant, a free event loop, cancellation-safe steps."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from safetensors.torch import load_file
from structlog.testing import capture_logs

from actors import ActorStopped, ActorSystem
from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.errors import DuplicateTenantError, NonFiniteError, UnknownTenantError
from clora.messages import (
    AddTenant,
    AdapterSnapshot,
    ComputeLogprobs,
    Datum,
    ExportAdapter,
    ExportStoreState,
    ForwardBackward,
    ImportAdapter,
    OptimStep,
    RemoveTenant,
    Snapshot,
    StepMetrics,
    TrainStepResult,
    TrainStep,
)
from clora.events import TRAINER_STEP, TRAINER_STEP_REJECTED
from clora.trainer.actor import TrainerActor
from clora.testing import make_data

LORA = LoraConfig(rank=4, alpha=8.0)
OPTIM = OptimConfig(lr=1e-2)


async def test_trainer_actor_serves_every_message(tiny_model_dir, tmp_path, device):
    with capture_logs() as logs:
        async with ActorSystem("trainer-test") as system:
            ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(queue_size=4, device=str(device)))
            assert await ref.ask(AddTenant(tenant="a", lora=LORA, optim=OPTIM)) == 0
            with pytest.raises(DuplicateTenantError):
                await ref.ask(AddTenant(tenant="a", lora=LORA, optim=OPTIM))
            metrics = (await ref.ask(TrainStep(tenant="a", data=make_data(4, seed=1), loss=LossConfig()))).metrics
            assert isinstance(metrics, StepMetrics) and metrics.version == 1 and metrics.tenant == "a"
            for key in ("loss", "grad_norm", "clip_frac", "kl_sampler", "entropy", "lr", "tokens", "time/swap_in",
                        "time/fwd_bwd", "time/optim", "time/swap_out", "version"):
                assert key in metrics.values, key
            fb = await ref.ask(ForwardBackward(tenant="a", data=make_data(2, seed=2), loss=LossConfig()))
            assert fb.version == 1
            assert (await ref.ask(OptimStep(tenant="a"))).version == 2
            data = make_data(3, seed=3)
            logprobs = await ref.ask(ComputeLogprobs(tenant="a", data=data))
            assert [len(r) for r in logprobs] == [len(d.tokens) for d in data] and logprobs[0][0] == 0.0
            assert await ref.ask(ExportAdapter(tenant="a", out_dir=str(tmp_path / "a"))) == 2
            snap = await ref.ask(Snapshot(tenant="a"))
            assert isinstance(snap, AdapterSnapshot) and snap.version == 2 and snap.peft_config["r"] == 4
            on_disk = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
            assert on_disk.keys() == snap.tensors.keys()
            assert all(torch.equal(on_disk[k], snap.tensors[k]) for k in on_disk)
            await ref.ask(AddTenant(tenant="b", lora=LORA, optim=OPTIM))
            assert await ref.ask(ImportAdapter(tenant="b", path=str(tmp_path / "a"))) == 1
            assert await ref.ask(ComputeLogprobs(tenant="b", data=data)) == logprobs
            await ref.ask(RemoveTenant(tenant="a"))
            with pytest.raises(UnknownTenantError):
                await ref.ask(TrainStep(tenant="a", data=data, loss=LossConfig()))
            assert ref.alive
    steps = [e for e in logs if e["event"] == TRAINER_STEP]
    assert [e["version"] for e in steps] == [1, 2]
    first = steps[0]
    assert first["tenant"] == "a" and first["step"] == 1 and first["duration_s"] > 0
    assert first["queue_depth"] >= 0 and first["loss"] == metrics.values["loss"]


def _nan_data() -> list[Datum]:
    d = make_data(1, seed=9)[0]
    i = d.loss_mask.index(1.0)
    bad = Datum(tokens=d.tokens, loss_mask=d.loss_mask, sampler_logprobs=d.sampler_logprobs,
                advantages=d.advantages[:i] + [float("nan")] + d.advantages[i + 1:])
    return [bad]


async def test_non_finite_step_fails_only_that_tenant(tiny_model_dir, device):
    with capture_logs() as logs:
        async with ActorSystem("trainer-nan") as system:
            ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(device=str(device)))
            await ref.ask(AddTenant(tenant="good", lora=LORA, optim=OPTIM))
            await ref.ask(AddTenant(tenant="bad", lora=LORA, optim=OPTIM))
            before = (await ref.ask(Snapshot(tenant="bad"))).tensors
            bad_step = ref.ask(TrainStep(tenant="bad", data=_nan_data(), loss=LossConfig()))
            good_step = ref.ask(TrainStep(tenant="good", data=make_data(2, seed=4), loss=LossConfig()))
            results = await asyncio.gather(bad_step, good_step, return_exceptions=True)
            assert isinstance(results[0], NonFiniteError) and "adapter stays at version 0" in str(results[0])
            assert isinstance(results[1], TrainStepResult) and results[1].metrics.version == 1
            after = await ref.ask(Snapshot(tenant="bad"))
            assert after.version == 0 and all(torch.equal(before[k], after.tensors[k]) for k in before)
            assert ref.alive
    rejected = [e for e in logs if e["event"] == TRAINER_STEP_REJECTED]
    assert len(rejected) == 1 and rejected[0]["tenant"] == "bad"


async def test_the_worker_thread_runs_under_the_configured_cpu_policy(tiny_model_dir):
    """TrainerConfig.cpus / nice / num_threads act on the trainer's worker thread (trainer.started reports
    what that thread runs under); the event loop's thread keeps its own policy."""
    import os

    from clora.events import TRAINER_STARTED
    from clora.trainer.cpu_policy import thread_policy

    cpu = max(os.sched_getaffinity(0))
    before = thread_policy()
    with capture_logs() as logs:
        async with ActorSystem("trainer-cpus") as system:
            await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(cpus=str(cpu), nice=3, num_threads=1))
    started = [e for e in logs if e["event"] == TRAINER_STARTED]
    assert [(e["cpus"], e["nice"], e["threads"]) for e in started] == [([cpu], min(19, before["nice"] + 3), 1)]
    assert thread_policy() == before


async def test_a_step_does_not_block_the_event_loop(tiny_model_dir):
    async with ActorSystem("trainer-loop") as system:
        ref = await TrainerActor.start_in(system, tiny_model_dir)
        await ref.ask(AddTenant(tenant="t", lora=LORA, optim=OPTIM))
        data = make_data(64, seed=5, min_len=200, max_len=250)
        gaps: list[float] = []
        step = asyncio.ensure_future(ref.ask(TrainStep(tenant="t", data=data, loss=LossConfig())))
        last = time.perf_counter()
        while not step.done():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        metrics = (await step).metrics
        step_s = metrics.values["time/fwd_bwd"]
        assert step_s > 0.2, "the step is too short to show anything"
        assert len(gaps) > 10 and max(gaps) < step_s / 2, (max(gaps), step_s)


async def test_abort_during_a_step_waits_for_a_complete_write_back(tiny_model_dir):
    """Stopping with mode='abort' cancels the running handler; the step still finishes and the
    store is either untouched or fully at the next version, never half-written."""
    async with ActorSystem("trainer-abort") as system:
        actor = TrainerActor(tiny_model_dir)
        ref = await system.start(actor, name="trainer")
        await ref.ask(AddTenant(tenant="t", lora=LORA, optim=OPTIM))
        core = actor.core
        assert core is not None
        v0 = {k: t.clone() for k, t in core.store("t").params.items()}
        data = make_data(64, seed=6, min_len=200, max_len=250)
        step = asyncio.ensure_future(ref.ask(TrainStep(tenant="t", data=data, loss=LossConfig())))
        await asyncio.sleep(0.2)  # the step is running in the worker thread now
        assert not step.done()
        await system.stop(ref, mode="abort")
        with pytest.raises(ActorStopped, match="interrupted"):
            await step
        store = core.store("t")
        assert store.version == 1 and store.grad_normalize is None
        assert any(not torch.equal(t, v0[k]) for k, t in store.params.items())
        assert all(not g.any() for g in store.grads.values())
        assert not actor.worker.running  # on_stop shut the worker down after the step


async def test_missing_model_fails_start_with_a_clear_error(tmp_path):
    from clora.errors import ModelNotFoundError

    async with ActorSystem("trainer-missing") as system:
        actor = TrainerActor(tmp_path / "no-such-model")
        with pytest.raises(ModelNotFoundError, match="no-such-model"):
            await system.start(actor, name="trainer")
        assert not actor.worker.running


async def test_every_device_job_gives_freed_heap_memory_back(tiny_model_dir, monkeypatch):
    import threading

    import clora.trainer.memory as memory_module
    from clora.trainer.memory import release_free_memory

    assert release_free_memory()  # glibc here: malloc_trim is found and called
    threads: list[str] = []
    monkeypatch.setattr(memory_module, "release_free_memory", lambda: threads.append(threading.current_thread().name))
    async with ActorSystem("trainer-trim") as system:
        ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(queue_size=4))
        await ref.ask(AddTenant(tenant="a", lora=LORA, optim=OPTIM))
        before = len(threads)
        await ref.ask(TrainStep(tenant="a", data=make_data(2, seed=1), loss=LossConfig()))
        with pytest.raises(NonFiniteError):  # also after a step that raises
            await ref.ask(TrainStep(tenant="a", data=_nan_data(), loss=LossConfig()))
    assert len(threads) >= before + 2
    assert all("device" in name for name in threads)  # in the trainer's device thread


@pytest.mark.parametrize("fuse_max", [1, 3])
async def test_a_train_step_replies_with_the_copies_it_asked_for(tiny_model_dir, fuse_max, device):
    """The adapter / store copies in a TrainStep's reply are the new version, identical to asking afterwards."""
    async with ActorSystem("trainer-copies") as system:
        ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(fuse_max=fuse_max, device=str(device)))
        for tenant in ("a", "b"):
            await ref.ask(AddTenant(tenant=tenant, lora=LORA, optim=OPTIM))
        plain = await ref.ask(TrainStep(tenant="a", data=make_data(2, seed=1), loss=LossConfig()))
        assert plain.adapter is None and plain.state is None and "time/copy" not in plain.metrics.values
        asks = [ref.ask(TrainStep(tenant=t, data=make_data(2, seed=i), loss=LossConfig(),
                                  copy_adapter=True, copy_state=True)) for i, t in enumerate(("a", "b"))]
        replies = await asyncio.gather(*asks)
        for reply in replies:
            snap = await ref.ask(Snapshot(tenant=reply.metrics.tenant))
            state = await ref.ask(ExportStoreState(tenant=reply.metrics.tenant))
            assert reply.adapter.version == reply.state.version == reply.metrics.version == snap.version
            assert reply.adapter.peft_config == snap.peft_config
            assert all(torch.equal(reply.adapter.tensors[k], snap.tensors[k]) for k in snap.tensors)
            for field in ("params", "exp_avg", "exp_avg_sq"):
                ours, theirs = getattr(reply.state, field), getattr(state, field)
                assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
            assert reply.state.adam_step == state.adam_step and reply.metrics.values["time/copy"] >= 0
        # the copies are copies: a later step does not change them
        kept = {k: v.clone() for k, v in replies[1].adapter.tensors.items()}
        await ref.ask(TrainStep(tenant="b", data=make_data(2, seed=5), loss=LossConfig()))
        assert all(torch.equal(replies[1].adapter.tensors[k], kept[k]) for k in kept)
