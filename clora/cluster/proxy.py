"""Driver-side proxies: the sampler and the trainer as local actors whose work happens in a Ray host.

A proxy is registered in the driver's ActorSystem under the actor's own name with the actor's own inbox,
so tenants, SyncActor, the scheduler and serve keep using an ActorRef as before. Its one concurrent
handler forwards each message to the host (``HostLink.call``) and returns the reply or raises the error
there, so ask and tell keep their meaning (a told message whose handling fails crashes the proxy, as it
would crash the actor). Backpressure: at most ``max_concurrency`` calls are in flight; behind them the
proxy's bounded mailbox fills and senders wait. Cancelling an ask cancels the remote call (an explicit
``cancel`` of its sequence number). The host's events arrive by a long poll and are logged here.

Supervision: the host's death (RayActorError), or its actor's crash there, crashes the proxy (it tells
itself ``HostDied``) with the error a local crash has: the sampler's is an EngineDeadError (the engine
died with its process: ``sampler.engine_died``), the trainer's a HostDiedError, both fatal; the proxy's
supervision (ESCALATE) then acts exactly as for the local actor, with ``cluster.host_died`` beside it.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import msgspec

from actors import Actor, ActorCrashed, ActorStopped, handler
from clora import events
from clora.cluster.link import HostLink, actor_died_errors
from clora.cluster.relay import replay
from clora.cluster.shipping import Shipments
from clora.cluster.wire import decode, encode
from clora.errors import EngineDeadError, HostDiedError
from clora.messages import LoadAdapter, RegisterAdapter, RemoveAdapter, SamplerMsg, TrainerMsg
from clora.sampler.actor import SamplerActor
from clora.trainer.actor import MAX_QUEUED_STEPS

__all__ = ["SamplerProxy", "TrainerProxy", "HostDied", "POLL_S"]

POLL_S = 1.0  # the longest a host's event waits before the driver takes it (long poll: usually at once)


class HostDied(msgspec.Struct, frozen=True):
    """Told to itself when the host died or its actor crashed there, so the proxy crashes."""


class _RemoteActor(Actor):
    """What both proxies share; each adds its actor's inbox and one handler forwarding it."""

    role: ClassVar[str] = ""
    inbox = HostDied  # the subclasses' inboxes add their actor's messages

    def __init__(self, link: HostLink, *, shipments: Shipments | None = None, poll_s: float = POLL_S) -> None:
        self.link = link
        self._shipments = shipments
        self._poll_s = poll_s
        self._poller: asyncio.Task[None] | None = None
        self._death: BaseException | None = None
        self._stopping = False
        self._died = actor_died_errors()

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self._poller = asyncio.create_task(self._poll(), name=f"{self.name}:events")

    async def on_stop(self) -> None:
        self._stopping = True
        try:
            replay(self.log, await self.link.stop())
        except self._died:
            pass
        await self._end_poller()
        self.link.kill()

    async def on_failure(self, exc: BaseException) -> None:
        """The host died, or a told message failed (the proxy crashes as the actor would): release the host."""
        self._stopping = True
        if self._death is not None:
            self.log.error(events.CLUSTER_HOST_DIED, role=self.role, replica=self.link.replica,
                           error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, EngineDeadError):  # as SamplerActor.on_failure logs it
            self.log.error(events.ENGINE_DIED, error=str(exc))
        await self._end_poller()
        self.link.kill()

    async def _end_poller(self) -> None:
        if self._poller is None:
            return
        done, _ = await asyncio.wait([self._poller], timeout=self._poll_s + 2.0)
        if not done:
            self._poller.cancel()
            await asyncio.wait([self._poller])

    # ------------------------------------------------------------------ events and death

    async def _poll(self) -> None:
        while True:
            try:
                batch, crash = await self.link.take_events(self._poll_s)
            except self._died as exc:
                if not self._stopping:
                    await self._report(exc)
                return
            replay(self.log, batch)
            if crash is not None:
                await self._report(crash)
                return
            if self._stopping:
                return

    async def _report(self, cause: BaseException) -> None:
        """The host is gone (or its actor crashed there): crash this proxy with the local crash's error."""
        if self._death is not None:
            return
        self._death = self._error(cause)
        try:
            await self.ref.tell(HostDied())
        except ActorStopped:
            pass  # stopping anyway

    def _error(self, cause: BaseException) -> BaseException:
        if isinstance(cause, ActorCrashed):  # the actor crashed in its host: its own error
            return cause.cause
        where = f"replica {self.link.replica} on node {self.link.placement.get('node_id', '?')}"
        text = f"the Ray actor hosting the {self.role} ({where}) died: {type(cause).__name__}: {cause}"
        error = EngineDeadError(text) if self.role == "sampler" else HostDiedError(text)
        error.__cause__ = cause
        return error

    @handler
    async def host_died(self, msg: HostDied) -> None:
        assert self._death is not None
        raise self._death

    # ------------------------------------------------------------------ forwarding

    async def _forward(self, msg: Any) -> Any:
        if self._death is not None:
            raise self._death
        files = None
        if self._shipments is not None and isinstance(msg, (RegisterAdapter, LoadAdapter)):
            loop = asyncio.get_running_loop()
            started = loop.time()
            files, size, shipped = await self._shipments.ship(msg.tenant, msg.path)
            if shipped:
                self.log.info(events.CLUSTER_ADAPTER_SHIPPED, tenant=msg.tenant, version=msg.version,
                              size_bytes=size, duration_s=round(loop.time() - started, 4))
        seq, reply = self.link.call(encode(msg), files)
        try:
            status, value = await reply
        except asyncio.CancelledError:
            self.link.cancel(seq)
            raise
        except self._died as exc:
            await self._report(exc)
            raise self._death from None
        if status == "ok":
            if isinstance(msg, RemoveAdapter) and self._shipments is not None:
                self._shipments.forget(msg.tenant)
            return decode(value)
        if status == "error":
            raise value
        raise ActorStopped(self.name, f"cancelled {type(msg).__qualname__} on its host")


class SamplerProxy(_RemoteActor):
    """The sampler (one replica) hosted by a Ray actor; adapters are shipped through the object store."""

    role = "sampler"
    mailbox_size = SamplerActor.mailbox_size
    inbox = SamplerMsg | HostDied

    @handler(concurrent=True, max_concurrency=SamplerActor.mailbox_size)
    async def forward(self, msg: SamplerMsg) -> Any:
        return await self._forward(msg)


class TrainerProxy(_RemoteActor):
    """The trainer hosted by a Ray actor (start it with ``mailbox_size=TrainerConfig.queue_size``)."""

    role = "trainer"
    inbox = TrainerMsg | HostDied

    @handler(concurrent=True, max_concurrency=MAX_QUEUED_STEPS)
    async def forward(self, msg: TrainerMsg) -> Any:
        return await self._forward(msg)
