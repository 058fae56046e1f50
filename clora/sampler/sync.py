"""SyncActor: puts a tenant's newest trainer weights into the running engine, in place.

One publish = snapshot the tenant's adapter from the trainer (CPU tensor copies), or take the
snapshot a TrainStep replied with (copied in the step's own device job: no second wait behind
other tenants' steps), write it as a PEFT directory under a memory-backed folder (``/dev/shm``
where it exists, so no disk round trip), then ask the sampler to load it in place under the
tenant's existing LoRA id. Versions are monotonic per tenant: a snapshot that is not newer than
what serves is not published again.
A failed load leaves the previous version serving and raises ``PublishError`` to the caller.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from actors import Actor, ActorRef, handler
from clora import events
from clora.errors import CloraError, FatalError, PublishError
from clora.checkpoint.atomic import build_dir_atomically, remove_orphans
from clora.trainer.peft_io import export_peft
from clora.messages import (
    AdapterSnapshot,
    LoadAdapter,
    Publish,
    Published,
    RegisterAdapter,
    RemoveAdapter,
    Snapshot,
    SyncMsg,
)

__all__ = ["SyncActor", "default_publish_root"]

KEEP_VERSIONS = 2  # the serving version and the one before it


_ROOT_PREFIX = "clora-adapters-"


def default_publish_root() -> Path:
    """A memory-backed folder when the OS has one (Linux /dev/shm), else the temp dir.

    The folder name carries the pid; folders of processes that died without cleaning up
    (SIGKILL) are swept here, so memory-backed space does not leak across runs.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    remove_orphans(base, _ROOT_PREFIX)
    return Path(tempfile.mkdtemp(prefix=f"{_ROOT_PREFIX}{os.getpid()}-", dir=base))


class SyncActor(Actor):
    mailbox_size = 64
    inbox = SyncMsg

    def __init__(self, trainer: ActorRef, sampler: ActorRef, publish_root: Path | None = None) -> None:
        super().__init__()
        self._trainer = trainer
        self._sampler = sampler
        self._root_given = publish_root is not None
        self._root = Path(publish_root) if publish_root is not None else None
        self._serving: dict[str, int] = {}  # tenant -> version live in the engine
        self._locks: dict[str, asyncio.Lock] = {}

    async def on_start(self) -> None:
        if self._root is None:
            self._root = default_publish_root()
        self._root.mkdir(parents=True, exist_ok=True)

    async def on_stop(self) -> None:
        self._cleanup()

    async def on_failure(self, exc: BaseException) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._root is not None and not self._root_given:
            shutil.rmtree(self._root, ignore_errors=True)

    def serving_version(self, tenant: str) -> int | None:
        return self._serving.get(tenant)

    @handler(concurrent=True)
    async def publish(self, msg: Publish) -> Published:
        """Tenants publish concurrently; one tenant's publishes run one at a time, in order."""
        lock = self._locks.setdefault(msg.tenant, asyncio.Lock())
        async with lock:
            return await self._publish(msg)

    async def _publish(self, msg: Publish) -> Published:
        started = time.perf_counter()
        snap: AdapterSnapshot = msg.adapter if msg.adapter is not None else await self._trainer.ask(
            Snapshot(tenant=msg.tenant)
        )
        if snap.tenant != msg.tenant:
            raise PublishError(f"publish for tenant {msg.tenant!r} was given tenant {snap.tenant!r}'s adapter")
        live = self._serving.get(msg.tenant)
        if live is not None and snap.version <= live:
            return Published(tenant=msg.tenant, version=live, duration_s=0.0)
        path = self._root / msg.tenant / f"v{snap.version}"
        try:
            write = asyncio.ensure_future(asyncio.to_thread(_write_atomically, snap, path))
            try:
                size = await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait([write])  # never leave a writer behind the folder's cleanup
                raise
            if live is None:
                await self._sampler.ask(RegisterAdapter(tenant=msg.tenant, path=str(path), version=snap.version))
            else:
                await self._sampler.ask(LoadAdapter(tenant=msg.tenant, path=str(path), version=snap.version,
                                                    keep_serving=msg.keep_serving))
        except FatalError:
            raise
        except (CloraError, OSError) as e:
            self.log.warning(
                events.PUBLISH_FAILED, tenant=msg.tenant, version=snap.version, serving_version=live, error=str(e)
            )
            raise PublishError(
                f"publishing version {snap.version} of tenant {msg.tenant!r} failed "
                f"(version {live} keeps serving): {e}"
            ) from e
        self._serving[msg.tenant] = snap.version
        self._prune(msg.tenant, snap.version)
        duration = time.perf_counter() - started
        self.log.info(
            events.ADAPTER_PUBLISHED, tenant=msg.tenant, adapter_version=snap.version,
            duration_s=round(duration, 4), size_bytes=size,
        )
        return Published(tenant=msg.tenant, version=snap.version, duration_s=duration)

    @handler(concurrent=True)
    async def forget(self, msg: RemoveAdapter) -> None:
        """Unload a tenant from the engine and drop its published files."""
        async with self._locks.setdefault(msg.tenant, asyncio.Lock()):
            if msg.tenant in self._serving:
                await self._sampler.ask(msg)
                del self._serving[msg.tenant]  # only once the engine let go of it
            shutil.rmtree(self._root / msg.tenant, ignore_errors=True)
        self._locks.pop(msg.tenant, None)

    def _prune(self, tenant: str, newest: int) -> None:
        folder = self._root / tenant
        for child in folder.iterdir():
            if child.name.startswith("v") and child.name[1:].isdigit() and int(child.name[1:]) <= newest - KEEP_VERSIONS:
                shutil.rmtree(child, ignore_errors=True)


def _write_atomically(snap: AdapterSnapshot, path: Path) -> int:
    """Write the PEFT dir to a sibling temp folder, then rename it into place; return its bytes."""
    build_dir_atomically(path, lambda tmp: export_peft(snap.tensors, snap.peft_config, tmp), replace=True)
    return sum(f.stat().st_size for f in path.iterdir())
