"""Whether a checkpoint or an adapter fits this runtime and tenant: base model, LoRA shape, owner, progress.

Each check raises one error naming the first difference (``AdapterMismatchError`` for the model
or adapter shape, ``CheckpointError`` for the rest); the checkpoint itself is never changed.
``lora_shape_mismatch`` is the one LoRA shape rule (rank, alpha, target modules) that checkpoints,
restored store states and imported PEFT adapters are held to. No torch import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from clora.config import LoraConfig
from clora.errors import AdapterMismatchError, CheckpointError

if TYPE_CHECKING:
    from clora.checkpoint.format import BaseModelIdentity, CheckpointManifest

__all__ = ["LoraShapeMismatch", "lora_shape_mismatch", "check_lora_shape", "check_compatible", "check_resumable"]


class LoraShapeMismatch(NamedTuple):
    """The first LoRA shape field in which an adapter differs from a tenant's LoraConfig."""

    field: str  # "rank", "alpha" or "target modules"
    theirs: Any
    ours: Any


def lora_shape_mismatch(
    rank: Any, alpha: float, target_modules: Iterable[str] | None, lora: LoraConfig
) -> LoraShapeMismatch | None:
    """Compare an adapter's rank, alpha (as floats) and target modules (as a set; None: not a list of
    names) with ``lora``, in that order; None when all three match."""
    if rank != lora.rank:
        return LoraShapeMismatch("rank", rank, lora.rank)
    if float(alpha) != float(lora.alpha):
        return LoraShapeMismatch("alpha", alpha, lora.alpha)
    if target_modules is None or set(target_modules) != set(lora.target_modules):
        theirs = sorted(target_modules) if target_modules is not None else None
        return LoraShapeMismatch("target modules", theirs, sorted(lora.target_modules))
    return None


def check_lora_shape(theirs: LoraConfig, ours: LoraConfig, where: str, what: str) -> None:
    """AdapterMismatchError naming the first LoRA shape difference between ``what`` (e.g. "checkpoint")
    and the tenant's config, e.g. ``rank mismatch: checkpoint rank 4, tenant rank 8``."""
    mismatch = lora_shape_mismatch(theirs.rank, theirs.alpha, theirs.target_modules, ours)
    if mismatch is not None:
        field, a, b = mismatch
        raise AdapterMismatchError(f"{where}: {field} mismatch: {what} {field} {a}, tenant {field} {b}")


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
    check_lora_shape(manifest.lora, lora, where, "checkpoint")


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
