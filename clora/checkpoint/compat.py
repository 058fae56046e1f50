"""Whether a checkpoint fits this runtime and tenant: base model, LoRA shape, owner, progress.

Each check raises one error naming the first difference (``AdapterMismatchError`` for the model
or adapter shape, ``CheckpointError`` for the rest); the checkpoint itself is never changed.
"""

from __future__ import annotations

from typing import Any

from clora.checkpoint.format import BaseModelIdentity, CheckpointManifest
from clora.config import LoraConfig
from clora.errors import AdapterMismatchError, CheckpointError

__all__ = ["check_compatible", "check_resumable"]


def check_compatible(manifest: CheckpointManifest, base_model: BaseModelIdentity, lora: LoraConfig, where: str) -> None:
    """AdapterMismatchError naming the first difference between a checkpoint and this runtime/tenant."""
    theirs, ours = manifest.base_model, base_model
    for field in ("model_type", "hidden_size", "num_layers", "vocab_size", "config_sha256", "weights_fingerprint"):
        if getattr(theirs, field) != getattr(ours, field):
            raise AdapterMismatchError(
                f"{where}: base model mismatch ({field}): the checkpoint was made on {theirs.name!r} "
                f"({theirs.model_type}, hidden {theirs.hidden_size}, {theirs.num_layers} layers, {field}="
                f"{_short(getattr(theirs, field))}), this runtime's base is {ours.name!r} ({ours.model_type}, "
                f"hidden {ours.hidden_size}, {ours.num_layers} layers, {field}={_short(getattr(ours, field))})"
            )
    if manifest.lora.rank != lora.rank:
        raise AdapterMismatchError(f"{where}: rank mismatch: checkpoint rank {manifest.lora.rank}, tenant rank {lora.rank}")
    if float(manifest.lora.alpha) != float(lora.alpha):
        raise AdapterMismatchError(
            f"{where}: alpha mismatch: checkpoint alpha {manifest.lora.alpha}, tenant alpha {lora.alpha}"
        )
    if set(manifest.lora.target_modules) != set(lora.target_modules):
        raise AdapterMismatchError(
            f"{where}: target modules mismatch: checkpoint {sorted(manifest.lora.target_modules)}, "
            f"tenant {sorted(lora.target_modules)}"
        )


def check_resumable(
    manifest: CheckpointManifest, tenant: str, base_model: BaseModelIdentity, lora: LoraConfig, where: str
) -> None:
    """Everything a tenant checks before it resumes from ``manifest``: owner, base model, LoRA shape, progress."""
    if manifest.tenant != tenant:
        raise CheckpointError(f"{where}: it belongs to tenant {manifest.tenant!r}")
    check_compatible(manifest, base_model, lora, where)
    progress = manifest.progress
    if len(progress.records) != progress.step:
        raise CheckpointError(f"{where}: {len(progress.records)} step records for step {progress.step}")


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 else text
