"""The trainer's step queue under the scheduler, driven like a fake trainer: which pending steps run
next and which are fused, by priority and by fair share of device-seconds (no model, no device)."""

from __future__ import annotations

import pytest

from clora import events
from clora.config import LossConfig
from clora.messages import Datum, TrainStep
from clora.sched import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, Scheduler
from clora.trainer.step_queue import StepQueue
from clora.testing import RecordingLog


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(tenant: str, tokens: int = 4) -> TrainStep:
    datum = Datum(tokens=[1] * tokens, loss_mask=[1.0] * tokens, advantages=[1.0] * tokens,
                  sampler_logprobs=[0.0] * tokens)
    return TrainStep(tenant=tenant, data=[datum], loss=LossConfig())


async def test_the_higher_class_trains_first_and_a_tenants_steps_stay_in_order():
    sched = Scheduler(aging_s=1000, yield_to_higher="never")  # the order alone (yielding: test_sched_yield_actors)
    sched.set_policy("hi", priority=PRIORITY_INTERACTIVE)
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    queue = StepQueue(1, sched)
    pushed = [queue.push(_step(t)) for t in ("bg", "n", "hi", "hi", "bg")]
    order = []
    while len(queue):
        (group,) = [queue.take_group()]
        order.append(group[0])
        queue.charge(group, 1.0)
    assert [p.msg.tenant for p in order] == ["hi", "hi", "n", "bg", "bg"]
    assert order[0] is pushed[2] and order[1] is pushed[3]  # hi's own steps in arrival order
    assert order[3] is pushed[0]


async def test_fused_groups_take_the_best_tenants_in_the_schedulers_order():
    sched = Scheduler(aging_s=1000, yield_to_higher="never")
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    queue = StepQueue(2, sched)
    for t in ("bg", "a", "b", "a"):
        queue.push(_step(t))
    first = queue.take_group()
    assert [p.msg.tenant for p in first] == ["a", "b"]  # bg waits: its class is lower
    queue.charge(first, 2.0)
    assert [p.msg.tenant for p in queue.take_group()] == ["a", "bg"]  # a's second step, then bg fills the group


async def test_a_long_fake_run_gives_each_tenant_its_weighted_share_of_device_seconds():
    clock, seen = Clock(), []
    sched = Scheduler(aging_s=10_000, clock=clock, log=RecordingLog(seen))
    weights = {"a": 1.0, "b": 3.0, "c": 2.0}
    tokens = {"a": 40, "b": 10, "c": 25}  # steps of different sizes: the share is device time, not steps
    for tenant, weight in weights.items():
        sched.set_policy(tenant, weight=weight)
    # one step at a time: in a fused group each tenant has one step, which caps a share below its weight
    queue = StepQueue(1, sched)
    for tenant in weights:  # every tenant always has two steps queued (backlogged)
        queue.push(_step(tenant, tokens[tenant]))
        queue.push(_step(tenant, tokens[tenant]))
    for _ in range(1200):
        group = queue.take_group()
        seconds = 0.01 * sum(tokens[p.msg.tenant] for p in group)  # the fake device: time ~ tokens
        clock.now += seconds
        queue.charge(group, seconds)
        for p in group:
            queue.push(_step(p.msg.tenant, tokens[p.msg.tenant]))
    used = sched.usage("train")
    total = sum(used.values())
    for tenant, weight in weights.items():
        want = weight / sum(weights.values())
        assert abs(used[tenant] / total - want) / want < 0.10, (tenant, used)
    assert events.SCHEDULER_DECISION in {name for name, _ in seen}


async def test_a_discarded_step_leaves_no_wait_behind():
    sched = Scheduler(aging_s=1000)
    queue = StepQueue(1, sched)
    gone = queue.push(_step("a"))
    queue.push(_step("b"))
    queue.discard(gone)
    assert sched.waiting("train") == ["b"]
    assert [p.msg.tenant for p in queue.take_group()] == ["b"]
    assert queue.take_group() == []


async def test_a_trainstep_waiting_past_the_bound_is_reported_while_the_device_stays_busy(tiny_model_dir):
    import asyncio

    from actors import ActorSystem
    from clora.config import LoraConfig, OptimConfig, TrainerConfig
    from clora.messages import AddTenant
    from clora.testing import make_data
    from clora.trainer.actor import TrainerActor

    seen: list = []
    sched = Scheduler(wait_bound_s=0.05, log=RecordingLog(seen))
    async with ActorSystem("bound") as system:
        actor = TrainerActor(tiny_model_dir, TrainerConfig(), scheduler=sched)
        ref = await system.start(actor, name="trainer")
        await ref.ask(AddTenant(tenant="a", lora=LoraConfig(rank=2, alpha=4.0), optim=OptimConfig()))
        async with actor.device_lock:  # the device is busy: no decision is made while the step waits
            step = asyncio.ensure_future(ref.ask(TrainStep(tenant="a", data=make_data(2, seed=1), loss=LossConfig())))
            await asyncio.sleep(0.3)
            late = [f for name, f in seen if name == events.SCHEDULER_WAIT_EXCEEDED]
            assert [(f["tenant"], f["resource"]) for f in late] == [("a", "train")]  # once, not every poll
            assert late[0]["wait_s"] >= 0.05 and late[0]["bound_s"] == 0.05  # rounded to ms: 0.0504 is 0.05
        assert (await step).metrics.version == 1
