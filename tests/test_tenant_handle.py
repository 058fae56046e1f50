"""A TenantHandle operation is its message: parameters, docs and routing come from the message type and
the inbox of the actor that handles it."""

from __future__ import annotations

import inspect

import pytest

from actors import Actor, ActorSystem, UnknownMessage, handler
from clora.config import LossConfig
from clora.messages import (
    ComputeLogprobs,
    Datum,
    ForwardBackward,
    OptimStep,
    Publish,
    Published,
    SamplerMsg,
    StepMetrics,
    SyncMsg,
    TrainerMsg,
    TrainStep,
    TrainStepResult,
)
from clora.runtime import Runtime
from clora.tenant.handle import TenantHandle

DATA = [Datum(tokens=[1, 2, 3], loss_mask=[0.0, 1.0, 1.0], advantages=[0.0, 1.0, 1.0], sampler_logprobs=[0.0] * 3)]


class RecordingRuntime:
    def __init__(self) -> None:
        self.sent: list[object] = []

    async def ask(self, message: object) -> object:
        self.sent.append(message)
        if isinstance(message, TrainStep):
            return TrainStepResult(metrics=StepMetrics(tenant=message.tenant, version=1, values={"loss": 0.5}))
        return "reply"


async def test_an_operation_builds_its_message_for_the_tenant_and_returns_the_reply():
    runtime = RecordingRuntime()
    handle = TenantHandle(runtime, "t", 0)
    assert await handle.forward_backward(DATA) == "reply"
    assert await handle.forward_backward(DATA, LossConfig(kind="importance_sampling")) == "reply"
    assert await handle.optim_step() == "reply"
    metrics = await handle.train_step(DATA)
    result = await handle.train_step_result(data=DATA, copy_adapter=True)
    assert await handle.logprobs(DATA) == "reply"
    assert runtime.sent == [
        ForwardBackward(tenant="t", data=DATA, loss=LossConfig()),
        ForwardBackward(tenant="t", data=DATA, loss=LossConfig(kind="importance_sampling")),
        OptimStep(tenant="t"),
        TrainStep(tenant="t", data=DATA),
        TrainStep(tenant="t", data=DATA, copy_adapter=True),
        ComputeLogprobs(tenant="t", data=DATA),
    ]
    assert metrics == StepMetrics(tenant="t", version=1, values={"loss": 0.5})
    assert isinstance(result, TrainStepResult) and result.metrics == metrics


async def test_an_operation_has_the_messages_parameters_and_docs():
    handle = TenantHandle(RecordingRuntime(), "t", 0)
    params = inspect.signature(handle.train_step).parameters
    assert list(params) == ["data", "loss", "copy_adapter", "copy_state", "max_staleness", "stale_policy"]
    assert params["loss"].default == LossConfig() and params["data"].default is inspect.Parameter.empty
    assert handle.forward_backward.__doc__ == ForwardBackward.__doc__
    assert TenantHandle.optim_step.__doc__ == OptimStep.__doc__
    with pytest.raises(TypeError):
        await handle.optim_step(None, DATA)  # OptimStep has one field besides the tenant: optim
    with pytest.raises(TypeError):
        await handle.forward_backward()  # data is required


class _Sampler(Actor):
    inbox = SamplerMsg

    @handler
    async def any_sampler_message(self, msg: SamplerMsg) -> str:
        return "sampler"


class _Trainer(Actor):
    inbox = TrainerMsg

    @handler
    async def any_trainer_message(self, msg: TrainerMsg) -> str:
        return "trainer"


class _Sync(Actor):
    inbox = SyncMsg

    @handler
    async def any_sync_message(self, msg: SyncMsg) -> Published:
        return Published(tenant=msg.tenant, version=7, duration_s=0.0)


async def test_the_runtime_routes_each_message_to_the_actor_whose_inbox_declares_it():
    runtime = Runtime()
    async with ActorSystem("routes") as system:
        runtime.sampler = await system.start(_Sampler(), name="sampler")
        runtime.trainer = await system.start(_Trainer(), name="trainer")
        runtime.sync = await system.start(_Sync(), name="sync")
        handle = TenantHandle(runtime, "t", 0)
        assert await handle.optim_step() == "trainer"
        assert (await handle.publish()).version == 7 and handle.version == 7
        assert await handle.sample([1, 2, 3]) == "sampler"
        with pytest.raises(UnknownMessage):
            await runtime.ask(Published(tenant="t", version=1, duration_s=0.0))  # a reply, nobody's inbox
        assert await runtime.ask(Publish(tenant="t")) == Published(tenant="t", version=7, duration_s=0.0)
