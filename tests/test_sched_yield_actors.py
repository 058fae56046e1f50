"""Yielding to a higher class in the sampler (FakeEngine) and the trainer (step queue; tiny model):
a lower class's new work waits while a higher class is active, work already started is not touched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors import ActorSystem
from clora import events
from clora.config import EngineConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig, TrainerConfig
from clora.messages import AddTenant, Completion, Datum, RegisterAdapter, SampleRequest, SamplingSpec, TrainStep
from clora.sampler.actor import SamplerActor
from clora.sched import DECODE, PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, TRAIN, Scheduler
from clora.testing import FakeEngine, RecordingLog, make_data, until
from clora.trainer.step_queue import StepQueue

ANSWER = Completion(token_ids=[1], logprobs=[0.0], text="x", finish_reason="length")


class WatchingEngine(FakeEngine):
    """Records, as each request enters the engine, which tenants' requests are decoding."""

    def __init__(self, decode_s: float) -> None:
        super().__init__([ANSWER], max_model_len=64, read_adapters=False, decode_s=decode_s)
        self.entered: list[tuple[str, set[str]]] = []
        self.by_id: dict[int, str] = {}

    async def generate(self, prompt_token_ids, spec, adapter, **kw):
        tenant = adapter[0].split("#")[0]
        self.by_id[adapter[1]] = tenant
        self.entered.append((tenant, {self.by_id[i] for i in self._in_flight if i is not None}))
        return await super().generate(prompt_token_ids, spec, adapter, **kw)


def _policies(sched: Scheduler) -> Scheduler:
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    sched.set_policy("b", PRIORITY_BACKGROUND)
    return sched


def _sample(ref, tenant):
    return asyncio.ensure_future(ref.ask(SampleRequest(tenant=tenant, prompt_token_ids=[1, 2],
                                                       sampling=SamplingSpec(max_tokens=2))))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["engine", "never"])
async def test_new_background_requests_wait_while_the_interactive_tenant_decodes(mode):
    engine, seen = WatchingEngine(decode_s=0.3), []
    sched = _policies(Scheduler(linger_s=0.05, yield_to_higher=mode, log=RecordingLog(seen)))
    async with ActorSystem("t") as system:
        actor = SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(max_loras=2),
                             shared_engine=engine, scheduler=sched)
        ref = await system.start(actor, name="sampler")
        for t in ("i", "b"):
            await ref.ask(RegisterAdapter(tenant=t, path=f"/nowhere/{t}", version=0))
        early = _sample(ref, "b")  # in the engine before the interactive tenant starts
        await until(lambda: actor.in_flight("b") == 1)
        interactive = _sample(ref, "i")
        await until(lambda: actor.in_flight("i") == 1)
        late = _sample(ref, "b")
        await asyncio.sleep(0.1)
        assert not early.done()  # the request already in the engine runs on: nothing is cancelled
        if mode == "never":
            assert actor.in_flight("b") == 2  # priorities only order waiters: it decodes beside "i"
        else:
            assert actor.in_flight("b") == 1 and actor._yields.waiting() == ["b"]
        await asyncio.gather(early, interactive, late)
    assert (await early).adapter_version == 0
    entered_late = engine.entered[2]
    assert entered_late[0] == "b"
    assert ("i" in entered_late[1]) == (mode == "never")  # held: entered only once "i" was done
    yielded = [f for e, f in seen if e == events.SCHEDULER_YIELDED]
    assert [(f["tenant"], f["resource"], [r["tenant"] for r in f["to"]]) for f in yielded] == (
        [("b", DECODE, ["i"])] if mode == "engine" else [])


def _step(tenant: str) -> TrainStep:
    datum = Datum(tokens=[1] * 4, loss_mask=[1.0] * 4, advantages=[1.0] * 4, sampler_logprobs=[0.0] * 4)
    return TrainStep(tenant=tenant, data=[datum], loss=LossConfig())


@pytest.mark.parametrize("mode, fused", [("device", ["i"]), ("engine", ["i", "b"])])
async def test_a_fused_group_leaves_out_a_lower_class_under_device(mode, fused):
    queue = StepQueue(2, _policies(Scheduler(aging_s=1000, yield_to_higher=mode)))
    queue.push(_step("b"))
    queue.push(_step("i"))
    assert [p.msg.tenant for p in queue.take_group()] == fused


async def test_only_lower_class_steps_pending_leave_the_group_empty_until_the_linger_ends():
    sched = _policies(Scheduler(aging_s=1000, linger_s=0.05))
    queue = StepQueue(1, sched)
    sched.wait(DECODE, "i")
    sched.pick(DECODE)  # "i" decodes
    pending = queue.push(_step("b"))
    assert queue.take_group() == [] and sched.held(TRAIN, "b")
    ready = asyncio.ensure_future(queue.ready(pending))
    await asyncio.sleep(0.1)
    assert not ready.done()  # waits, no spin: nothing changed
    sched.charge(DECODE, "i", 0.1)
    await asyncio.wait_for(ready, 1.0)  # the linger timer woke it
    assert [p.msg.tenant for p in queue.take_group()] == ["b"] and not sched.held(TRAIN, "b")


@pytest.mark.parametrize("mode", ["device", "engine"])
async def test_a_background_step_does_not_start_while_the_interactive_tenant_decodes(tiny_model_dir, mode):
    from clora.trainer.actor import TrainerActor

    seen: list = []
    sched = _policies(Scheduler(linger_s=0.05, yield_to_higher=mode, log=RecordingLog(seen)))
    async with ActorSystem("yield") as system:
        ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(), scheduler=sched)
        await ref.ask(AddTenant(tenant="b", lora=LoraConfig(rank=2, alpha=4.0), optim=OptimConfig()))
        sched.wait(DECODE, "i")
        sched.pick(DECODE)  # the interactive tenant holds an engine LoRA slot (as the sampler's gate does)
        step = asyncio.ensure_future(ref.ask(TrainStep(tenant="b", data=make_data(2, seed=1), loss=LossConfig())))
        if mode == "engine":
            assert (await asyncio.wait_for(step, 30)).metrics.version == 1  # trains while "i" decodes
        else:
            await asyncio.sleep(0.5)
            assert not step.done() and sched.held(TRAIN, "b")
            sched.charge(DECODE, "i", 0.5)  # its requests finished
            assert (await asyncio.wait_for(step, 30)).metrics.version == 1
            resumed = [f for e, f in seen if e == events.SCHEDULER_RESUMED]
            assert [(f["tenant"], f["resource"], f["reason"]) for f in resumed] == [("b", TRAIN, "clear")]
