"""SyncActor between a fake trainer actor and a SamplerActor on a fake engine: monotonic versions, atomic files, failed publishes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors import Actor, ActorSystem, handler
from clora.config import EngineConfig, ModelConfig
from clora.errors import PublishError
from clora.messages import AdapterSnapshot, Publish, RemoveAdapter, Snapshot
from clora.sampler.actor import SamplerActor
from clora.sampler.sync import SyncActor
from clora.testing import FakeEngine

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


async def _start(system: ActorSystem, publish_root):
    """A SyncActor between a fake trainer and a SamplerActor on a FakeEngine (which reads every
    adapter it loads); returns the trainer, the engine, the sync actor and its ref."""
    trainer, engine = FakeTrainer(), FakeEngine(["never sampled"])
    t = await system.start(trainer, name="trainer")
    s = await system.start(SamplerActor(Path("model"), ModelConfig(source="tiny"), EngineConfig(), shared_engine=engine),
                           name="sampler")
    sync_actor = SyncActor(t, s, publish_root=publish_root)
    return trainer, engine, sync_actor, await system.start(sync_actor, name="sync")


def _calls(engine: FakeEngine) -> list[tuple[str, str, int, float]]:
    """(kind, tenant, version, the weight read from the file) of every adapter the engine loaded."""
    assert all(a.config["r"] == 2 for a in engine.adapters)
    return [("register" if a.kind == "add" else "load", a.tenant, a.version, float(next(iter(a.tensors.values()))[0, 0]))
            for a in engine.adapters]


async def test_publish_registers_then_loads_in_place_with_monotonic_versions(tmp_path):
    async with ActorSystem("t") as system:
        trainer, engine, sync_actor, sync = await _start(system, tmp_path)

        assert (await sync.ask(Publish(tenant="a"))).version == 0
        trainer.version = 1
        assert (await sync.ask(Publish(tenant="a"))).version == 1
        again = await sync.ask(Publish(tenant="a"))  # nothing newer: no second load
        assert again.version == 1 and again.duration_s == 0.0
        trainer.version = 2
        await sync.ask(Publish(tenant="a"))
        trainer.version = 3
        await sync.ask(Publish(tenant="a"))

        assert _calls(engine) == [("register", "a", 0, 0.0), ("load", "a", 1, 1.0), ("load", "a", 2, 2.0),
                                  ("load", "a", 3, 3.0)]
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["v2", "v3"]  # older versions pruned
        assert sync_actor.serving_version("a") == 3

        assert [a.tenant for a in engine.serving.values()] == ["a"]
        await sync.ask(RemoveAdapter(tenant="a"))
        assert not engine.serving and not (tmp_path / "a").exists()
        assert sync_actor.serving_version("a") is None


async def test_a_failed_load_keeps_the_previous_version_serving_and_is_reported(tmp_path):
    async with ActorSystem("t") as system:
        trainer, engine, sync_actor, sync = await _start(system, tmp_path)
        await sync.ask(Publish(tenant="a"))
        trainer.version = 1
        engine.refuse_load("a", 1, times=1, reason="engine refused the adapter")
        with pytest.raises(PublishError, match="version 0 keeps serving"):
            await sync.ask(Publish(tenant="a"))
        assert sync_actor.serving_version("a") == 0
        assert (await sync.ask(Publish(tenant="a"))).version == 1  # the next publish retries and succeeds
        assert _calls(engine)[-1] == ("load", "a", 1, 1.0)
        assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dirs left


async def test_a_given_snapshot_is_published_without_asking_the_trainer(tmp_path):
    async with ActorSystem("t") as system:
        trainer, engine, sync_actor, sync = await _start(system, tmp_path)
        await sync.ask(Publish(tenant="a"))
        snapshots = trainer.snapshots_served
        weight = torch.full((2, 4), 7.0)
        given = AdapterSnapshot(
            tenant="a", version=7, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": weight},
            peft_config={"r": 2, "lora_alpha": 4, "peft_type": "LORA"},
        )
        assert (await sync.ask(Publish(tenant="a", adapter=given))).version == 7
        assert trainer.snapshots_served == snapshots  # the trainer was not asked again
        assert _calls(engine)[-1] == ("load", "a", 7, 7.0) and sync_actor.serving_version("a") == 7
        older = AdapterSnapshot(tenant="a", version=6, tensors=given.tensors, peft_config=given.peft_config)
        assert (await sync.ask(Publish(tenant="a", adapter=older))).version == 7  # never an older version
        with pytest.raises(PublishError, match="tenant 'b'"):
            await sync.ask(Publish(tenant="b", adapter=given))
        assert sync_actor.serving_version("b") is None
