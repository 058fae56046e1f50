"""What the server keeps between requests: the runtime, the keys, the futures, and which tenant,
sampler snapshot or sampling session each Tinker / OpenAI name refers to."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from clora.errors import NotFoundError
from clora.serve.auth import KeyRing, Principal
from clora.serve.futures import FutureStore
from clora.tenant.handle import TenantHandle

__all__ = ["ServeState", "SamplingTarget"]


@dataclass(frozen=True)
class SamplingTarget:
    """What a sampling session samples from: a tenant (its serving version) or the base model (None)."""

    tenant: str | None


@dataclass
class ServeState:
    runtime: Any  # clora.runtime.Runtime (started)
    keys: KeyRing
    base_model: str  # the name clients use for the served base model
    futures: FutureStore = field(default_factory=FutureStore)
    tenants: dict[str, TenantHandle] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # tenant -> the key name that created it
    sessions: dict[str, str] = field(default_factory=dict)  # tinker session id -> key name
    sampling: dict[str, SamplingTarget] = field(default_factory=dict)  # sampling session id -> target
    checkpoints: dict[str, tuple[str, str]] = field(default_factory=dict)  # tinker:// path -> (folder, tenant)
    loras: dict[str, Any] = field(default_factory=dict)  # tenant -> its LoraConfig
    aliases: dict[str, str] = field(default_factory=dict)  # a model id the SDK derived ("<session>:train:<n>") -> tenant
    counter: Any = field(default_factory=lambda: itertools.count(1))
    ready: bool = False
    requests: int = 0
    errors: int = 0

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"

    def tenant(self, principal: Principal, name: str) -> TenantHandle:
        """The handle of tenant ``name`` if this key may use it; the same refusal whether it exists or not."""
        name = self.aliases.get(name, name)
        if not self._owns(principal, name):
            self.keys.check(principal, name)
        handle = self.tenants.get(name)
        if handle is None:
            raise NotFoundError(f"unknown model {name!r}")
        return handle

    def _owns(self, principal: Principal, name: str) -> bool:
        return self.owners.get(name) == principal.name and name in self.tenants

    def may_use(self, principal: Principal, name: str) -> bool:
        name = self.aliases.get(name, name)
        return principal.may_use(name) or self._owns(principal, name)
