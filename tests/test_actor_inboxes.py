"""Every clora actor declares its inbox (the single list of what it accepts), and the actor kernel
holds its handlers to exactly that union when the class is created."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import clora
from actors import Actor, handler
from actors.errors import ActorDefinitionError
from actors.handlers import union_members
from clora.messages import SampleRequest


def _clora_actor_classes() -> list[type[Actor]]:
    for info in pkgutil.walk_packages(clora.__path__, "clora."):
        importlib.import_module(info.name)
    found, stack = [], list(Actor.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("clora."):
            found.append(cls)
    return found


def test_every_clora_actor_declares_an_inbox_that_its_handlers_match_exactly():
    classes = _clora_actor_classes()
    assert {cls.__name__ for cls in classes} >= {"SamplerActor", "TrainerActor", "SyncActor", "TenantActor"}
    for cls in classes:
        assert cls.inbox is not None, f"{cls.__qualname__} declares no inbox"
        assert set(cls.__handlers__) == set(union_members(cls.inbox)), cls.__qualname__


def test_sync_actor_inbox_names_remove_adapter():
    from clora.messages import Publish, RemoveAdapter, SyncMsg

    assert set(union_members(SyncMsg)) == {Publish, RemoveAdapter}


def test_handlers_that_leave_the_declared_inbox_are_refused_at_class_creation():
    from clora.sampler.sync import SyncActor

    with pytest.raises(ActorDefinitionError, match=r"handlers outside the inbox for \['SampleRequest'\]"):
        class _Extra(SyncActor):
            @handler
            async def sample(self, msg: SampleRequest) -> None: ...

    with pytest.raises(ActorDefinitionError, match=r"no handler for \['RemoveAdapter'\]"):
        class _Missing(SyncActor):
            forget = None  # no longer a handler: RemoveAdapter would be undeliverable
