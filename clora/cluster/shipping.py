"""Adapter versions from the driver's memory to every sampler replica's memory, through Ray's object store.

The driver's SyncActor writes each version as a PEFT folder in its own memory-backed folder (/dev/shm) and
asks the sampler to load that path. A sampler on another node cannot read that path, so the sampler proxy
ships the folder's files instead: read once, ``ray.put`` once (``Shipments``: every replica loading the same
version gets the same object), fetched by each host from the object store and written into the host's own
memory-backed folder (``AdapterInbox``), whose path the host's SamplerActor then loads as usual.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from clora.checkpoint.atomic import build_dir_atomically

__all__ = ["Shipments", "AdapterInbox", "read_folder"]

KEEP_SHIPMENTS = 2  # versions per tenant kept in the object store (the serving one and the one before)


def read_folder(path: str | Path) -> dict[str, bytes]:
    """The files of a PEFT folder (flat: adapter_config.json, adapter_model.safetensors), by name."""
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir()) if f.is_file()}


class Shipments:
    """The driver's object-store copies of published adapter folders, by path; one put per version.

    Concurrent loads of one path (the pool publishing to every replica) await the same put.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, asyncio.Future[tuple[Any, int]]] = {}
        self._by_tenant: dict[str, list[str]] = {}

    async def ship(self, tenant: str, path: str) -> tuple[Any, int, bool]:
        """``(object ref, size in bytes, shipped now)`` of the folder at ``path``."""
        future = self._by_path.get(path)
        if future is not None:
            ref, size = await asyncio.shield(future)
            return ref, size, False
        future = asyncio.get_running_loop().create_future()
        self._by_path[path] = future
        try:
            ref, size = await asyncio.to_thread(_put_folder, path)
        except BaseException as exc:
            del self._by_path[path]
            future.set_exception(exc)
            future.exception()  # retrieved here; waiters see it too
            raise
        future.set_result((ref, size))
        paths = self._by_tenant.setdefault(tenant, [])
        paths.append(path)
        while len(paths) > KEEP_SHIPMENTS:
            self._by_path.pop(paths.pop(0), None)  # the object store frees it once no host holds the ref
        return ref, size, True

    def forget(self, tenant: str) -> None:
        for path in self._by_tenant.pop(tenant, []):
            self._by_path.pop(path, None)


def _put_folder(path: str) -> tuple[Any, int]:
    import ray

    files = read_folder(path)
    return ray.put(files), sum(len(b) for b in files.values())


class AdapterInbox:
    """The host side: adapter files received from the driver, written under the host's own memory-backed folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, tenant: str, version: int, files: dict[str, bytes]) -> tuple[Path, int]:
        """Write ``files`` as ``<root>/<tenant>/v<version>`` (atomically); drop versions older than the one
        before. Returns the folder and its size in bytes."""
        path = self.root / tenant / f"v{version}"

        def fill(tmp: Path) -> None:
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"adapter file name {name!r} is not a plain file name")
                (tmp / name).write_bytes(data)

        build_dir_atomically(path, fill, replace=True)
        for old in (self.root / tenant).iterdir():
            if old.name.startswith("v") and old.name[1:].isdigit() and int(old.name[1:]) < version - 1:
                shutil.rmtree(old, ignore_errors=True)
        return path, sum(len(b) for b in files.values())

    def forget(self, tenant: str) -> None:
        shutil.rmtree(self.root / tenant, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
