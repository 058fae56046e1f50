"""TrainerActor with fuse_max > 1: queued TrainSteps of different tenants are fused, replies stay per asker."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch
from structlog.testing import capture_logs

from actors import ActorSystem
from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.errors import ConfigError, NonFiniteError
from clora.trainer import TrainerCore
from clora.messages import AddTenant, Snapshot, TrainStep, TrainStepResult
from clora.events import TRAINER_STEP, TRAINER_STEP_REJECTED
from clora.trainer.actor import TrainerActor
from clora.testing import make_data, with_nonfinite

RANKS = {"a": 2, "b": 8, "c": 4, "d": 4}
CONFIG = TrainerConfig(micro_batch_size=4, fuse_max=3, queue_size=8)


def test_fuse_max_is_validated():
    with pytest.raises(ConfigError, match="trainer.fuse_max"):
        TrainerConfig(fuse_max=0)
    assert TrainerConfig().fuse_max == 1


async def start(system: ActorSystem, model_dir, config: TrainerConfig = CONFIG) -> tuple[TrainerActor, object]:
    actor = TrainerActor(model_dir, config)
    ref = await system.start(actor, name="trainer", mailbox_size=config.queue_size)
    for tenant, rank in RANKS.items():
        lora = LoraConfig(rank=rank, alpha=2.0 * rank, init_seed=rank)
        await ref.ask(AddTenant(tenant=tenant, lora=lora, optim=OptimConfig(lr=1e-2 * rank)))
    return actor, ref


async def until_pending(actor: TrainerActor, n: int) -> None:
    async with asyncio.timeout(30):
        while len(actor._steps) < n:
            await asyncio.sleep(0.001)


async def test_one_actor_queues_every_step_and_fuses_only_when_asked(tiny_model_dir):
    with capture_logs() as logs:
        async with ActorSystem("fused-pick") as system:
            plain = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(), name="plain")
            fused = await TrainerActor.start_in(system, tiny_model_dir, CONFIG, name="fused")
            await plain.ask(AddTenant(tenant="t", lora=LoraConfig(rank=2), optim=OptimConfig()))
            await fused.ask(AddTenant(tenant="t", lora=LoraConfig(rank=2), optim=OptimConfig()))
            single = (await plain.ask(TrainStep(tenant="t", data=make_data(2, seed=1), loss=LossConfig()))).metrics
            alone = (await fused.ask(TrainStep(tenant="t", data=make_data(2, seed=1), loss=LossConfig()))).metrics
    assert single.values["fused"] == alone.values["fused"] == 1.0  # one pending: single-adapter path
    assert alone.values["loss"] == single.values["loss"]
    steps = {e["actor"]: e for e in logs if e["event"] == TRAINER_STEP}
    assert steps["fused"]["wait_s"] >= 0 and steps["plain"]["wait_s"] >= 0  # both go through the step queue


async def test_pending_steps_are_fused_and_each_asker_gets_its_own_reply(tiny_model_dir, device):
    data = {t: make_data(2 + i, seed=10 + i) for i, t in enumerate(RANKS)}
    config = msgspec.structs.replace(CONFIG, device=str(device))
    cuda = device.type == "cuda"  # GPU kernels round differently per batch shape: wider, still << lr
    atol, rel = (5e-5, 1e-4) if cuda else (1e-5, 1e-5)
    with capture_logs() as logs:
        async with ActorSystem("fused-actor") as system:
            actor, ref = await start(system, tiny_model_dir, config)
            async with actor.device_lock:  # the device is busy: every TrainStep stays pending
                asks = [asyncio.ensure_future(ref.ask(TrainStep(tenant=t, data=data[t], loss=LossConfig())))
                        for t in ("a", "b", "a", "c", "d")]
                await until_pending(actor, 5)
            replies = [r.metrics for r in await asyncio.gather(*asks)]
            # the same data trained separately, in the same per-tenant order, on a fresh core
            core = TrainerCore.from_model_dir(tiny_model_dir, config)
            for tenant, rank in RANKS.items():
                core.add_tenant(tenant, LoraConfig(rank=rank, alpha=2.0 * rank, init_seed=rank),
                                OptimConfig(lr=1e-2 * rank))
            expected = [core.train_step(t, data[t], LossConfig()) for t in ("a", "b", "a", "c", "d")]
            for tenant in RANKS:
                snap = await ref.ask(Snapshot(tenant=tenant))
                ours = {k: v.clone() for k, v in core.snapshot(tenant).tensors.items()}
                for k, v in snap.tensors.items():
                    torch.testing.assert_close(v, ours[k], rtol=0, atol=atol)
    assert [r.tenant for r in replies] == ["a", "b", "a", "c", "d"]
    assert [r.version for r in replies] == [1, 1, 2, 1, 1]
    # first group: a, b, c (fuse_max 3; the second "a" waits for the next group), then a, d
    assert [r.values["fused"] for r in replies] == [3.0, 3.0, 2.0, 3.0, 2.0]
    for got, exp in zip(replies, expected, strict=True):
        assert got.values["loss"] == pytest.approx(exp["loss"], rel=rel)
        assert got.values["tokens"] == exp["tokens"]
    steps = [e for e in logs if e["event"] == TRAINER_STEP]
    assert sorted((e["tenant"], e["version"], e["fused"]) for e in steps) == sorted(
        (r.tenant, r.version, r.values["fused"]) for r in replies
    )
    assert all(e["queue_depth"] >= 0 and e["wait_s"] >= 0 for e in steps)


async def test_a_failing_or_cancelled_request_leaves_the_others_step_intact(tiny_model_dir, device):
    with capture_logs() as logs:
        async with ActorSystem("fused-fail") as system:
            actor, ref = await start(system, tiny_model_dir, msgspec.structs.replace(CONFIG, device=str(device)))
            before = {t: (await ref.ask(Snapshot(tenant=t))).tensors for t in ("b", "d")}
            async with actor.device_lock:
                ok_a = asyncio.ensure_future(ref.ask(TrainStep(tenant="a", data=make_data(3, seed=1), loss=LossConfig())))
                bad = with_nonfinite(make_data(3, seed=2), "nan_advantage")
                bad_b = asyncio.ensure_future(ref.ask(TrainStep(tenant="b", data=bad, loss=LossConfig())))
                gone_d = asyncio.ensure_future(ref.ask(TrainStep(tenant="d", data=make_data(3, seed=3), loss=LossConfig())))
                ok_c = asyncio.ensure_future(ref.ask(TrainStep(tenant="c", data=make_data(3, seed=4), loss=LossConfig())))
                await until_pending(actor, 4)
                gone_d.cancel()  # cancelled while pending: removed, never trained
                await asyncio.sleep(0.01)
                assert len(actor._steps) == 3
            a, b, c = await asyncio.gather(ok_a, bad_b, ok_c, return_exceptions=True)
            assert isinstance(a, TrainStepResult) and a.metrics.version == 1 and a.metrics.values["fused"] == 3.0
            assert isinstance(c, TrainStepResult) and c.metrics.version == 1 and c.metrics.values["fused"] == 3.0
            assert isinstance(b, NonFiniteError) and "tenant 'b'" in str(b)
            assert gone_d.cancelled()
            for tenant in ("b", "d"):
                after = await ref.ask(Snapshot(tenant=tenant))
                assert after.version == 0
                assert all(torch.equal(before[tenant][k], after.tensors[k]) for k in after.tensors)
            assert ref.alive
    rejected = [e for e in logs if e["event"] == TRAINER_STEP_REJECTED]
    assert [(e["tenant"], e["fused"]) for e in rejected] == [("b", 3)]
