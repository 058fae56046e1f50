"""What a run leaves on disk besides events: each tenant's final adapter in PEFT format.

A run folder looks like ``<run_dir>/events.jsonl`` and ``<run_dir>/tenants/<tenant>/adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, written by the runtime when a tenant's
experiment ends). The checks here read JSON and the safetensors header only: no torch.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import msgspec

from clora.errors import CloraError

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "ArtifactError",
    "PeftAdapterInfo",
    "tenant_adapter_dir",
    "check_peft_dir",
    "export_tenant_adapter",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"  # clora.trainer.peft_io.CONFIG_FILE
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # clora.trainer.peft_io.WEIGHTS_FILE


class ArtifactError(CloraError, OSError):
    """A run folder, tenant or adapter file is missing or not what it should be; the message names it."""


class PeftAdapterInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    tensors: int  # lora_A + lora_B weights in the safetensors file


def tenant_adapter_dir(run_dir: str | Path, tenant: str) -> Path:
    """``<run_dir>/tenants/<tenant>/adapter``, or ArtifactError naming what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"run folder {str(run)!r} does not exist")
    tenants_dir = run / "tenants"
    known = sorted(p.name for p in tenants_dir.iterdir() if p.is_dir()) if tenants_dir.is_dir() else []
    adapter = tenants_dir / tenant / "adapter"
    if not adapter.is_dir():
        if tenant not in known:
            hint = f"tenants with a folder: {', '.join(known)}" if known else "it has no tenants/ folder yet"
            raise ArtifactError(f"run folder {str(run)!r} has no tenant {tenant!r} ({hint})")
        raise ArtifactError(
            f"tenant {tenant!r} has no adapter at {str(adapter)!r}: the runtime writes it when the experiment "
            "finishes (did it fail or get interrupted?)"
        )
    return adapter


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{str(path)!r} is not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", head)
        if size > path.stat().st_size - 8:
            raise ArtifactError(f"{str(path)!r} is not a safetensors file (header length {size} too large)")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise ArtifactError(f"{str(path)!r} is not a safetensors file (bad header: {e})") from None
    return [k for k in header if k != "__metadata__"]


def check_peft_dir(path: str | Path) -> PeftAdapterInfo:
    """Check that ``path`` is a PEFT LoRA adapter directory; the error names the first missing piece."""
    adapter = Path(path)
    if not adapter.is_dir():
        raise ArtifactError(f"adapter folder {str(adapter)!r} does not exist")
    config_file = adapter / ADAPTER_CONFIG_FILE
    weights_file = adapter / ADAPTER_WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ArtifactError(f"{str(adapter)!r} is not a PEFT adapter folder: {needed.name} is missing")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except ValueError as e:
        raise ArtifactError(f"{str(config_file)!r} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"{str(config_file)!r}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ArtifactError(f"{str(config_file)!r} has no {key!r}")
    names = _safetensors_names(weights_file)
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    if not lora:
        raise ArtifactError(f"{str(weights_file)!r} holds no lora_A/lora_B weights ({len(names)} tensors)")
    targets = config["target_modules"]
    return PeftAdapterInfo(
        path=adapter, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        target_modules=tuple(sorted(targets if isinstance(targets, list) else [targets])),
        base_model=config.get("base_model_name_or_path"), tensors=len(lora),
    )


def export_tenant_adapter(run_dir: str | Path, tenant: str, out_dir: str | Path, *, force: bool = False) -> PeftAdapterInfo:
    """Copy a tenant's final adapter out of a run folder (checked before and after the copy)."""
    source = tenant_adapter_dir(run_dir, tenant)
    check_peft_dir(source)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ArtifactError(f"{str(out)!r} exists and is not empty; pass --force to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, out, dirs_exist_ok=True)
    return check_peft_dir(out)
