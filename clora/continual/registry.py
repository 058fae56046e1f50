"""A tenant's named versions, their lineage and the aliases that point at them, kept on disk.

The registry is one JSON file (``<run_dir>/tenants/<name>/continual/registry.json``), rewritten
atomically and durably on every change; replacing it is the commit point of a new version, a
promotion or a rollback. Each version's files live beside it under ``versions/v<N>/``
(``adapter/``: the PEFT folder the engine loads; ``state/``: the trainer store as a checkpoint,
clora.checkpoint.format). A version folder the registry does not name (a crash between writing
the folder and committing the registry) is ignored and overwritten.

Aliases (``production``, ``candidate``, any name) point at versions; every alias keeps the stack of
the versions it pointed at before, so ``rollback`` is one pop. The feedback a version trained on is
recorded with it (``VersionInfo.feedback``): the set of applied feedback is read from the same file
that names the trainer state it went into, so a crash can neither lose nor double it.
Pure: no actors, no torch.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Final

import msgspec

from clora.checkpoint.atomic import write_bytes_atomically
from clora.errors import CheckpointError, ConfigError, UnknownVersionError

__all__ = ["REGISTRY_FILE", "VersionInfo", "Registry", "validate_alias"]

REGISTRY_FILE: Final = "registry.json"
_FORMAT: Final = "clora.continual.registry"
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class VersionInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One committed version of a tenant's adapter and where it came from."""

    version: int  # the trainer's version number (optimizer steps taken by the store since it began)
    parent: int | None  # the version it was trained from (None: the first)
    steps: int  # optimizer steps behind it, all ancestors included
    data: int  # sequences trained into it, all ancestors included
    created_at: float
    scores: dict[str, float] = {}  # gate name -> score (filled by promotions)
    feedback: list[int] = []  # feedback sequence numbers trained into it (from its parent)


class _File(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: str
    tenant: str
    versions: list[VersionInfo]
    aliases: dict[str, int]
    history: dict[str, list[int]]  # alias -> the versions it pointed at before, oldest first
    consumed: list[int] = []  # feedback used by a learner step that trained nothing (no signal)


def validate_alias(alias: str) -> str:
    """An alias: 1-64 letters, digits, '_', '-', '.', starting with a letter (so never a version number)."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise ConfigError(f"alias {alias!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter")
    return alias


class Registry:
    """The versions and aliases of one tenant, as in ``folder/registry.json``."""

    def __init__(self, folder: str | Path, tenant: str) -> None:
        self.folder = Path(folder)
        self.tenant = tenant
        self._versions: dict[int, VersionInfo] = {}
        self._aliases: dict[str, int] = {}
        self._history: dict[str, list[int]] = {}
        self._consumed: list[int] = []

    # ------------------------------------------------------------------ disk

    @property
    def path(self) -> Path:
        return self.folder / REGISTRY_FILE

    def version_dir(self, version: int) -> Path:
        return self.folder / "versions" / f"v{version}"

    def adapter_dir(self, version: int) -> Path:
        """The PEFT folder of ``version`` (what the engine loads)."""
        return self.version_dir(version) / "adapter"

    def state_dir(self, version: int) -> Path:
        """The trainer-store checkpoint of ``version`` (what a resume restores)."""
        return self.version_dir(version) / "state"

    @classmethod
    def load(cls, folder: str | Path, tenant: str) -> Registry:
        """The registry in ``folder`` (empty when there is none)."""
        registry = cls(folder, tenant)
        if not registry.path.is_file():
            return registry
        try:
            data = msgspec.json.decode(registry.path.read_bytes(), type=_File)
        except msgspec.DecodeError as e:
            raise CheckpointError(f"version registry {str(registry.path)!r} is corrupt: {e}") from None
        if data.format != _FORMAT or data.tenant != tenant:
            raise CheckpointError(f"{str(registry.path)!r} is not tenant {tenant!r}'s version registry")
        registry._versions = {v.version: v for v in data.versions}
        registry._aliases = dict(data.aliases)
        registry._history = {k: list(v) for k, v in data.history.items()}
        registry._consumed = list(data.consumed)
        return registry

    def save(self) -> None:
        """Commit the registry (atomic and durable: a crash leaves the old file or the new one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = _File(format=_FORMAT, tenant=self.tenant, versions=[self._versions[v] for v in sorted(self._versions)],
                     aliases=self._aliases, history=self._history, consumed=self._consumed)
        write_bytes_atomically(self.path, msgspec.json.format(msgspec.json.encode(data), indent=1), durable=True)

    # ------------------------------------------------------------------ versions

    def __contains__(self, version: int) -> bool:
        return version in self._versions

    def versions(self) -> list[VersionInfo]:
        """Every committed version, oldest first."""
        return [self._versions[v] for v in sorted(self._versions)]

    @property
    def head(self) -> VersionInfo | None:
        """The newest committed version."""
        return self._versions[max(self._versions)] if self._versions else None

    def get(self, version: int) -> VersionInfo:
        try:
            return self._versions[version]
        except KeyError:
            known = ", ".join(str(v) for v in sorted(self._versions)) or "none"
            raise UnknownVersionError(f"tenant {self.tenant!r} has no version {version} (versions: {known})") from None

    def add(self, info: VersionInfo) -> None:
        """Record a new version (call ``save`` to commit it)."""
        if info.version in self._versions:
            raise ConfigError(f"tenant {self.tenant!r} already has a version {info.version}")
        self._versions[info.version] = info

    def child(self, version: int, *, parent: int | None, steps: int, data: int,
              feedback: list[int] = ()) -> VersionInfo:
        """A new version's record: ``parent`` (None: the first), ``data`` trained since the parent."""
        base = None if parent is None else self.get(parent)
        return VersionInfo(version=version, parent=parent, steps=steps, data=(0 if base is None else base.data) + data,
                           created_at=time.time(), feedback=list(feedback))

    def set_scores(self, version: int, scores: dict[str, float]) -> None:
        info = self.get(version)
        self._versions[version] = msgspec.structs.replace(info, scores={**info.scores, **scores})

    # ------------------------------------------------------------------ aliases

    def aliases(self) -> dict[str, int]:
        return dict(self._aliases)

    def resolve(self, version: int | str) -> int:
        """A version number, or the version an alias (or ``"v7"``) points at; UnknownVersionError otherwise."""
        if isinstance(version, bool):
            raise UnknownVersionError(f"version {version!r} is neither a version number nor an alias")
        if isinstance(version, int):
            return self.get(version).version
        if isinstance(version, str) and version[:1] == "v" and version[1:].isdigit():
            return self.get(int(version[1:])).version
        if isinstance(version, str) and version.isdigit():
            return self.get(int(version)).version
        if version not in self._aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(self._aliases.items())) or "none"
            raise UnknownVersionError(f"tenant {self.tenant!r} has no alias {version!r} (aliases: {known})")
        return self._aliases[version]

    def point(self, alias: str, version: int) -> int | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before (kept for rollback)."""
        validate_alias(alias)
        self.get(version)
        previous = self._aliases.get(alias)
        if previous == version:
            return previous
        if previous is not None:
            self._history.setdefault(alias, []).append(previous)
        self._aliases[alias] = version
        return previous

    def rollback(self, alias: str) -> tuple[int, int]:
        """Point ``alias`` back at the version it pointed at before; returns (from, to)."""
        history = self._history.get(alias)
        if alias not in self._aliases:
            raise UnknownVersionError(f"tenant {self.tenant!r} has no alias {alias!r} to roll back")
        if not history:
            raise UnknownVersionError(
                f"alias {alias!r} of tenant {self.tenant!r} has no earlier version to roll back to "
                f"(it has pointed at v{self._aliases[alias]} only)")
        current, previous = self._aliases[alias], history.pop()
        self._aliases[alias] = previous
        if not history:
            del self._history[alias]
        return current, previous

    def history(self, alias: str) -> list[int]:
        return list(self._history.get(alias, []))

    # ------------------------------------------------------------------ feedback bookkeeping

    def applied_feedback(self) -> set[int]:
        """Feedback already used: trained into a committed version, or consumed by a step without signal."""
        applied = set(self._consumed)
        for info in self._versions.values():
            applied.update(info.feedback)
        return applied

    def consume(self, seqs: list[int]) -> None:
        """Record feedback a learner step used without training (no signal); call ``save`` to commit."""
        self._consumed.extend(seqs)
