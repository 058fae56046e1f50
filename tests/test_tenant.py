"""TenantActor lifecycle on fake actors: a failed start leaves nothing registered anywhere."""

from __future__ import annotations

import pytest

from actors import Actor, ActorSystem, Supervision, handler
from clora.config import ExperimentConfig
from clora.errors import PublishError
from clora.messages import AddTenant, Publish, Published, RemoveAdapter, RemoveTenant
from clora.tenant.actor import TenantActor

pytestmark = pytest.mark.timeout(30)


class Ledger(Actor):
    """Plays trainer and sync at once: records registrations; publishing fails on demand."""

    def __init__(self, fail_publish: bool) -> None:
        self.registered: set[str] = set()
        self.serving: set[str] = set()
        self.fail_publish = fail_publish

    @handler
    async def add(self, msg: AddTenant) -> int:
        self.registered.add(msg.tenant)
        return 0

    @handler
    async def publish(self, msg: Publish) -> Published:
        if self.fail_publish:
            raise PublishError("engine refused version 0")
        self.serving.add(msg.tenant)
        return Published(tenant=msg.tenant, version=0, duration_s=0.0)

    @handler
    async def remove_adapter(self, msg: RemoveAdapter) -> None:
        self.serving.discard(msg.tenant)

    @handler
    async def remove_tenant(self, msg: RemoveTenant) -> None:
        self.registered.remove(msg.tenant)


def _tenant(ledger_ref) -> TenantActor:
    return TenantActor(
        ExperimentConfig(name="t"), env=None, renderer=None, sampler=None, trainer=ledger_ref, sync=ledger_ref,
        max_model_len=128,
    )


async def test_a_failed_first_publish_unregisters_the_tenant_from_the_trainer():
    ledger = Ledger(fail_publish=True)
    async with ActorSystem("t") as system:
        ref = await system.start(ledger, name="ledger")
        with pytest.raises(PublishError):
            await system.start(_tenant(ref), name="tenant:t", supervision=Supervision.ISOLATE)
        assert ledger.registered == set() and ledger.serving == set()


async def test_stopping_a_tenant_releases_it_everywhere():
    ledger = Ledger(fail_publish=False)
    async with ActorSystem("t") as system:
        ref = await system.start(ledger, name="ledger")
        tenant = await system.start(_tenant(ref), name="tenant:t", supervision=Supervision.ISOLATE)
        assert ledger.registered == {"t"} and ledger.serving == {"t"}
        await system.stop(tenant, mode="abort")
        assert ledger.registered == set() and ledger.serving == set()
