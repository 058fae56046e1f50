"""ActorHost: the body of the Ray actor that runs one runtime actor (the sampler or the trainer).

Each host runs its own ``actors.ActorSystem`` on the Ray actor's asyncio loop (Ray runs ``async def``
methods of an actor on one loop) with one actor in it, named as in the driver ("sampler", "trainer"),
supervised ESCALATE: its crash ends the host's system and is reported to the driver (``take_events``),
whose proxy then crashes with it. The driver reaches the actor only through ``call``: calls carry a
sequence number and enter the actor's mailbox in that order (Ray may start an async actor's calls out of
order), each as an ``ask`` whose reply, or error, goes back. ``cancel`` withdraws a call like a cancelled
local ask (queued: dropped; concurrent handler: cancelled; sequential handler: finishes, reply dropped).

This module imports no Ray: ``clora.cluster.link`` makes it a Ray actor class. Tests may drive it directly.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from actors import ActorRef, ActorSystem, Supervision
from clora import events
from clora.cluster.relay import EventBuffer, buffer_logger
from clora.cluster.shipping import AdapterInbox
from clora.cluster.wire import decode, encode, portable_error
from clora.config import RuntimeConfig, decode_config
from clora.messages import LoadAdapter, RegisterAdapter, RemoveAdapter

__all__ = ["ActorHost", "ROLES"]

ROLES = ("sampler", "trainer")


class ActorHost:
    """Runs the runtime actor ``role`` of ``config`` (RuntimeConfig as JSON bytes) in this process.

    ``engine``: an engine object for the sampler instead of starting vLLM (a ``FakeEngine``: it is copied
    here, so the driver's instance does not see what this one does). ``node_id``: where this runs (Ray's
    node id; the host name when None).
    """

    def __init__(self, role: str, config: bytes, replica: int = 0, engine: Any = None,
                 node_id: str | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.replica = replica
        self.config: RuntimeConfig = decode_config(config, RuntimeConfig, fmt="json")
        self._engine = engine
        self.placement = {"role": role, "replica": replica, "pid": os.getpid(),
                          "node_id": node_id or socket.gethostname()}
        self.buffer = EventBuffer(self.placement)
        self.log = buffer_logger(self.buffer).bind(system=f"clora:{role}")
        self._ref: ActorRef | None = None
        self._main: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._crash: BaseException | None = None
        self._next_seq = 0
        self._turn: asyncio.Condition | None = None
        self._cancelled: set[int] = set()  # calls withdrawn before they arrived
        self._withdrawn: set[int] = set()  # calls withdrawn while their ask ran
        self._running: dict[int, asyncio.Task[Any]] = {}
        self._inbox: AdapterInbox | None = None
        self.scheduler: Any = None  # the actor's Scheduler: its policies mirror the driver's

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> dict[str, Any]:
        """Start the actor (the sampler's engine or the trainer's model load); returns the placement fields."""
        started = time.perf_counter()
        self.buffer.bind_loop()
        self._turn = asyncio.Condition()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._main = asyncio.create_task(self._run(ready), name=f"clora-host:{self.role}")
        await ready
        self.log.info(events.CLUSTER_HOST_STARTED, role=self.role, replica=self.replica,
                      node_id=self.placement["node_id"], pid=self.placement["pid"],
                      duration_s=round(time.perf_counter() - started, 3))
        return dict(self.placement)

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            async with ActorSystem(f"clora:{self.role}", logger=self.log) as system:
                self._ref = await self._start_actor(system)
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, never lost
            if not ready.done():
                ready.set_exception(exc)
            else:
                self._crash = exc
                self.buffer.wake()
        finally:
            if self._inbox is not None:
                self._inbox.close()

    async def _start_actor(self, system: ActorSystem) -> ActorRef:
        cfg = self.config
        from clora.sched import Scheduler

        scheduler = self.scheduler = Scheduler(aging_s=cfg.scheduler.aging_s, wait_bound_s=cfg.scheduler.wait_bound_s,
                                               yield_to_higher=cfg.scheduler.yield_to_higher,
                                               linger_s=cfg.scheduler.linger_s, log=system.log)
        if self.role == "trainer":
            from clora.trainer.actor import TrainerActor

            return await TrainerActor.start_in(system, cfg.model, cfg.trainer, scheduler=scheduler)
        from clora.models import resolve_model
        from clora.precision import engine_dtype
        from clora.sampler.actor import SamplerActor
        from clora.sampler.engine_weights import engine_model_dir
        from clora.sampler.sync import default_publish_root

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        model_cfg = msgspec.structs.replace(cfg.model, dtype=engine_dtype(cfg.model.dtype))
        model_dir = await asyncio.to_thread(resolve_model, cfg.model)
        engine_dir = model_dir if self._engine is not None else await asyncio.to_thread(
            engine_model_dir, model_dir, model_cfg.dtype)
        self._inbox = AdapterInbox(default_publish_root())
        actor = SamplerActor(engine_dir, model_cfg, cfg.engine, shared_engine=self._engine, scheduler=scheduler,
                             max_resident=cfg.scheduler.max_resident_adapters,
                             work_dir=Path(tempfile.mkdtemp(prefix="clora-sampler-")) if self._engine is None else None)
        return await system.start(actor, name="sampler", supervision=Supervision.ESCALATE)

    async def stop(self) -> list[bytes]:
        """Stop the actor (drain) and the host's system; returns the events not taken yet."""
        self._stop.set()
        if self._main is not None:
            await asyncio.wait([self._main])
        self.log.info(events.CLUSTER_HOST_STOPPED, role=self.role, replica=self.replica)
        return await self.buffer.take(0)

    def ping(self) -> dict[str, Any]:
        return dict(self.placement)

    # ------------------------------------------------------------------ the driver's calls

    async def call(self, seq: int, payload: Any, files: dict[str, bytes] | None = None) -> tuple[str, Any]:
        """Ask the actor ``payload`` (``clora.cluster.wire``) as the ``seq``-th call; ``("ok", reply)``,
        ``("error", exception)`` or ``("cancelled", None)``. ``files``: an adapter's files for the path of a
        RegisterAdapter / LoadAdapter (written here first)."""
        msg = decode(payload)
        if files is not None and isinstance(msg, (RegisterAdapter, LoadAdapter)):
            started = time.perf_counter()
            path, size = await asyncio.to_thread(self._inbox.write, msg.tenant, msg.version, files)
            self.log.info(events.CLUSTER_ADAPTER_RECEIVED, actor=self.role, tenant=msg.tenant, version=msg.version,
                          size_bytes=size, duration_s=round(time.perf_counter() - started, 4))
            msg = msgspec.structs.replace(msg, path=str(path))
        await self._wait_turn(seq)
        if seq in self._cancelled:
            self._cancelled.discard(seq)
            await self._advance()
            self._log_cancelled(msg)
            return ("cancelled", None)
        if self._ref is None:
            await self._advance()
            return ("error", RuntimeError(f"the {self.role} host is not started"))
        task = asyncio.ensure_future(self._ref.ask(msg))
        self._running[seq] = task
        await asyncio.sleep(0)  # the ask is in the mailbox (or first in line for it) before the next call goes
        await self._advance()
        try:
            reply = await task
        except asyncio.CancelledError:
            if seq not in self._withdrawn:
                raise  # Ray cancelled this call itself (the ask went with it)
            self._withdrawn.discard(seq)
            self._log_cancelled(msg)
            return ("cancelled", None)
        except Exception as exc:  # noqa: BLE001 - the asker's error, as for a local ask
            return ("error", portable_error(exc))
        finally:
            self._running.pop(seq, None)
        if isinstance(msg, RemoveAdapter) and self._inbox is not None:
            self._inbox.forget(msg.tenant)
        return ("ok", encode(reply))

    def cancel(self, seq: int) -> None:
        """The asker of call ``seq`` gave up: withdraw it like a cancelled local ask."""
        task = self._running.get(seq)
        if task is not None:
            self._withdrawn.add(seq)
            task.cancel()
        elif seq >= self._next_seq:  # not arrived (or waiting for its turn): skipped when it does
            self._cancelled.add(seq)

    def _log_cancelled(self, msg: Any) -> None:
        self.log.info(events.CLUSTER_CALL_CANCELLED, actor=self.role, message=type(msg).__qualname__)

    async def _wait_turn(self, seq: int) -> None:
        assert self._turn is not None, "ActorHost.start was not called"
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_seq == seq)

    async def _advance(self) -> None:
        async with self._turn:
            self._next_seq += 1
            self._turn.notify_all()

    async def policy(self, seq: int, tenant: str, priority: int | None, weight: float | None) -> None:
        """As the ``seq``-th call: the driver's scheduling policy of ``tenant`` (None: forget it). The decisions
        about this actor's resource (engine LoRA slots, the device) are made here with these policies."""
        await self._wait_turn(seq)
        try:
            if self.scheduler is not None:
                if priority is None:
                    self.scheduler.remove(tenant)
                else:
                    self.scheduler.set_policy(tenant, priority, weight)
        finally:
            await self._advance()

    async def take_events(self, timeout_s: float = 1.0) -> tuple[list[bytes], BaseException | None]:
        """Events logged here since the last take (waiting up to ``timeout_s`` for one), and the actor's crash."""
        batch = await self.buffer.take(0 if self._crash is not None else timeout_s)
        return batch, None if self._crash is None else portable_error(self._crash)
