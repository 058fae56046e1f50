"""SyncActor on fake trainer and sampler actors: monotonic versions, atomic files, failed publishes."""

from __future__ import annotations

import json

import pytest
import torch

from actors import Actor, ActorSystem, handler
from clora.errors import AdapterMismatchError, PublishError
from clora.messages import (
    AdapterLoaded,
    AdapterSnapshot,
    LoadAdapter,
    Publish,
    RegisterAdapter,
    RemoveAdapter,
    Snapshot,
)
from clora.sampler.sync import SyncActor

pytestmark = pytest.mark.timeout(30)


class FakeTrainer(Actor):
    def __init__(self) -> None:
        self.version = 0
        self.snapshots_served = 0

    @handler
    async def snapshot(self, msg: Snapshot) -> AdapterSnapshot:
        self.snapshots_served += 1
        weight = torch.full((2, 4), float(self.version))  # (r, in): the version is readable in the weights
        return AdapterSnapshot(
            tenant=msg.tenant, version=self.version,
            tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": weight},
            peft_config={"r": 2, "lora_alpha": 4, "peft_type": "LORA"},
        )


class FakeSampler(Actor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, float]] = []  # (kind, tenant, version, weight read from the file)
        self.fail_next_load = False
        self.removed: list[str] = []

    def _read(self, path: str) -> float:
        from safetensors.torch import load_file

        (tensor,) = load_file(f"{path}/adapter_model.safetensors").values()
        assert json.loads(open(f"{path}/adapter_config.json").read())["r"] == 2
        return float(tensor[0, 0])

    @handler
    async def register(self, msg: RegisterAdapter) -> AdapterLoaded:
        self.calls.append(("register", msg.tenant, msg.version, self._read(msg.path)))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=0.0)

    @handler
    async def load(self, msg: LoadAdapter) -> AdapterLoaded:
        if self.fail_next_load:
            self.fail_next_load = False
            raise AdapterMismatchError("engine refused the adapter")
        self.calls.append(("load", msg.tenant, msg.version, self._read(msg.path)))
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=0.0)

    @handler
    async def remove(self, msg: RemoveAdapter) -> None:
        self.removed.append(msg.tenant)


async def _start(system: ActorSystem, publish_root):
    """A SyncActor between a fake trainer and a fake sampler; returns the fakes, the actor and its ref."""
    trainer, sampler = FakeTrainer(), FakeSampler()
    t = await system.start(trainer, name="trainer")
    s = await system.start(sampler, name="sampler")
    sync_actor = SyncActor(t, s, publish_root=publish_root)
    return trainer, sampler, sync_actor, await system.start(sync_actor, name="sync")


async def test_publish_registers_then_loads_in_place_with_monotonic_versions(tmp_path):
    async with ActorSystem("t") as system:
        trainer, sampler, sync_actor, sync = await _start(system, tmp_path)

        assert (await sync.ask(Publish(tenant="a"))).version == 0
        trainer.version = 1
        assert (await sync.ask(Publish(tenant="a"))).version == 1
        again = await sync.ask(Publish(tenant="a"))  # nothing newer: no second load
        assert again.version == 1 and again.duration_s == 0.0
        trainer.version = 2
        await sync.ask(Publish(tenant="a"))
        trainer.version = 3
        await sync.ask(Publish(tenant="a"))

        assert sampler.calls == [("register", "a", 0, 0.0), ("load", "a", 1, 1.0), ("load", "a", 2, 2.0),
                                 ("load", "a", 3, 3.0)]
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["v2", "v3"]  # older versions pruned
        assert sync_actor.serving_version("a") == 3

        await sync.ask(RemoveAdapter(tenant="a"))
        assert sampler.removed == ["a"] and not (tmp_path / "a").exists()
        assert sync_actor.serving_version("a") is None


async def test_a_failed_load_keeps_the_previous_version_serving_and_is_reported(tmp_path):
    async with ActorSystem("t") as system:
        trainer, sampler, sync_actor, sync = await _start(system, tmp_path)
        await sync.ask(Publish(tenant="a"))
        trainer.version = 1
        sampler.fail_next_load = True
        with pytest.raises(PublishError, match="version 0 keeps serving"):
            await sync.ask(Publish(tenant="a"))
        assert sync_actor.serving_version("a") == 0
        assert (await sync.ask(Publish(tenant="a"))).version == 1  # the next publish retries and succeeds
        assert sampler.calls[-1] == ("load", "a", 1, 1.0)
        assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dirs left


async def test_a_given_snapshot_is_published_without_asking_the_trainer(tmp_path):
    async with ActorSystem("t") as system:
        trainer, sampler, sync_actor, sync = await _start(system, tmp_path)
        await sync.ask(Publish(tenant="a"))
        snapshots = trainer.snapshots_served
        weight = torch.full((2, 4), 7.0)
        given = AdapterSnapshot(
            tenant="a", version=7, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": weight},
            peft_config={"r": 2, "lora_alpha": 4, "peft_type": "LORA"},
        )
        assert (await sync.ask(Publish(tenant="a", adapter=given))).version == 7
        assert trainer.snapshots_served == snapshots  # the trainer was not asked again
        assert sampler.calls[-1] == ("load", "a", 7, 7.0) and sync_actor.serving_version("a") == 7
        older = AdapterSnapshot(tenant="a", version=6, tensors=given.tensors, peft_config=given.peft_config)
        assert (await sync.ask(Publish(tenant="a", adapter=older))).version == 7  # never an older version
        with pytest.raises(PublishError, match="tenant 'b'"):
            await sync.ask(Publish(tenant="b", adapter=given))
        assert sync_actor.serving_version("b") is None
