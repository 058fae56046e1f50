"""The engine-level names of tenants' adapter versions, ``"tenant#lora_id@vversion"``.

The name carries the LoRA id and the version: vLLM's prefix cache keys on it, so KV blocks computed
with an older version (or an earlier tenant of the same name) are never reused.
"""

from __future__ import annotations

__all__ = ["adapter_name", "parse_adapter_name"]


def adapter_name(tenant: str, lora_id: int, version: int) -> str:
    """The engine-level name of ``tenant``'s adapter ``version`` under ``lora_id``."""
    return f"{tenant}#{lora_id}@v{version}"


def parse_adapter_name(name: str) -> tuple[str, int]:
    """``(tenant, version)`` of a name made by ``adapter_name``; ValueError for any other name."""
    tenant, sep, rest = name.rpartition("#")
    lora_id, at, version = rest.partition("@v")
    if not (tenant and sep and at and lora_id.isdigit() and version.isdigit()):
        raise ValueError(f"{name!r} is not a sampler adapter name (tenant#lora_id@vversion)")
    return tenant, int(version)
