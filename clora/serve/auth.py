"""API keys: who may reach which tenant.

Keys come from a JSON file (``clora serve --keys FILE``) or the ``CLORA_SERVE_KEYS`` environment
variable holding the same JSON, never from the command line::

    {"keys": [{"name": "alice", "key": "tml-alice-secret", "tenants": ["alice-math"]},
              {"name": "ops", "key": "tml-ops-secret", "admin": true}]}

A key reaches the tenants it lists and those it created; an admin key reaches every tenant. With
no key configured the server answers loopback clients only, each as admin. A refused request gets
``AccessDeniedError`` (403) whose message is the same whether the tenant exists or not.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from clora.errors import AccessDeniedError, ConfigError

__all__ = ["KEYS_ENV", "KeyRing", "Principal", "LOOPBACK"]

KEYS_ENV = "CLORA_SERVE_KEYS"
LOOPBACK = frozenset({"127.0.0.1", "::1"})
DENIED = "not allowed: this API key cannot use that model"


@dataclass
class Principal:
    """One API key's identity (``name``) and reach."""

    name: str
    admin: bool = False
    tenants: set[str] = field(default_factory=set)

    def may_use(self, tenant: str) -> bool:
        return self.admin or tenant in self.tenants


class KeyRing:
    """The configured keys (secret -> Principal); empty means loopback-only, every client admin."""

    def __init__(self, keys: Mapping[str, Principal] | None = None) -> None:
        self._keys = dict(keys or {})

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def parse(cls, text: str, origin: str) -> "KeyRing":
        try:
            doc = json.loads(text)
            entries = doc["keys"]
            keys = {}
            for i, entry in enumerate(entries):
                secret, name = entry["key"], entry.get("name", f"key{i}")
                if not isinstance(secret, str) or len(secret) < 8:
                    raise ConfigError(f"{origin}: keys[{i}].key must be a string of at least 8 characters")
                keys[secret] = Principal(name=name, admin=bool(entry.get("admin", False)),
                                         tenants=set(entry.get("tenants", [])))
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{origin}: expected {{\"keys\": [{{\"key\": ..., \"name\": ..., \"tenants\": [...]}}]}} "
                              f"({type(e).__name__}: {e})") from None
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> "KeyRing":
        """From ``path`` when given, else from ``$CLORA_SERVE_KEYS``, else empty (loopback only)."""
        if path is not None:
            try:
                return cls.parse(Path(path).read_text(), str(path))
            except OSError as e:
                raise ConfigError(f"--keys {path}: {e.strerror or e}") from None
        text = (environ if environ is not None else os.environ).get(KEYS_ENV)
        return cls.parse(text, f"${KEYS_ENV}") if text else cls()

    def authenticate(self, secret: str | None, client_host: str | None) -> Principal:
        """The request's principal, or AccessDeniedError."""
        if not self._keys:
            if client_host in LOOPBACK:
                return Principal(name="local", admin=True)
            raise AccessDeniedError("not allowed: no API keys are configured, so only loopback clients are served")
        if secret:
            for known, principal in self._keys.items():
                if hmac.compare_digest(known.encode(), secret.encode()):
                    return principal
        raise AccessDeniedError("not allowed: missing or unknown API key")

    @staticmethod
    def check(principal: Principal, tenant: str) -> None:
        if not principal.may_use(tenant):
            raise AccessDeniedError(DENIED)


def request_secret(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: Tinker's ``X-Api-Key`` or OpenAI's ``Authorization: Bearer``."""
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None
