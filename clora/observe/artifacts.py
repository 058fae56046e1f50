"""What a run leaves on disk besides events: each tenant's final adapter in PEFT format.

A run folder looks like ``<run_dir>/events.jsonl`` and ``<run_dir>/tenants/<tenant>/adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, written by the runtime when a tenant's
experiment ends). The checks here read JSON and the safetensors header only (clora.checkpoint.peft_dir):
no torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec

from clora.checkpoint.peft_dir import (
    CONFIG_FILE,
    adapter_version,
    config_target_modules,
    read_peft_dir,
    safetensors_names,
)
from clora.errors import CloraError

__all__ = [
    "ArtifactError",
    "PeftAdapterInfo",
    "tenant_adapter_dir",
    "check_peft_dir",
    "export_tenant_adapter",
]

class ArtifactError(CloraError, OSError):
    """A run folder, tenant or adapter file is missing or not what it should be; the message names it."""


class PeftAdapterInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    tensors: int  # lora_A + lora_B weights in the safetensors file
    version: int | None = None  # the trainer's adapter version, when clora wrote the file


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


def check_peft_dir(path: str | Path) -> PeftAdapterInfo:
    """Check that ``path`` is a PEFT LoRA adapter directory; the error names the first missing piece."""
    folder = read_peft_dir(path, ArtifactError)
    config, config_file = folder.config, folder.path / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"{str(config_file)!r}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ArtifactError(f"{str(config_file)!r} has no {key!r}")
    names = safetensors_names(folder.weights_file, ArtifactError)
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    if not lora:
        raise ArtifactError(f"{str(folder.weights_file)!r} holds no lora_A/lora_B weights ({len(names)} tensors)")
    return PeftAdapterInfo(
        path=folder.path, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        target_modules=tuple(sorted(config_target_modules(config))),
        base_model=config.get("base_model_name_or_path"), tensors=len(lora),
        version=adapter_version(folder.weights_file, ArtifactError),
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
