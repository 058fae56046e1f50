"""Per-tenant checkpoints on disk: write atomically, read, validate. No actors, no pickle.

A checkpoint is a folder (``<run_dir>/tenants/<name>/checkpoint/``) holding

- ``state-<sha12>.safetensors``: the tenant's whole AdapterStore, fp32, store-named tensors under
  the prefixes ``params/``, ``exp_avg/``, ``exp_avg_sq/`` and (only while a gradient is
  accumulated) ``grads/``;
- ``manifest.json`` (msgspec JSON): format version, base model identity, LoRA and optimizer
  config, the store's counters, the tensor file's name, size and SHA-256, a digest of the tensor
  contents, and the tenant's progress (step, RNG state, step records, accuracy so far).

Writing: the tensor file goes to a temp file in the same folder, is fsynced and renamed into place
(the folder fsynced too), then the manifest the same way; replacing the manifest is the commit
point. Older tensor files are deleted only after that. A crash at any moment leaves either the
previous checkpoint or the new one, never a mix. Reading checks size and SHA-256 before the
tensors are parsed, so a truncated or altered file is a ``CheckpointError``, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clora.checkpoint.atomic import TMP_SUFFIX, write_bytes_atomically
from clora.config import LoraConfig, OptimConfig
from clora.errors import CheckpointError
from clora.messages import StoreState

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "BaseModelIdentity",
    "RngState",
    "TenantProgress",
    "CheckpointManifest",
    "Checkpoint",
    "base_model_identity",
    "rng_state",
    "restore_rng",
    "state_digest",
    "write_checkpoint",
    "read_manifest",
    "read_checkpoint",
    "has_checkpoint",
    "remove_checkpoint",
    "checkpoint_steps",
]

FORMAT: Final = "clora.checkpoint.format"
FORMAT_VERSION: Final = 1
MANIFEST_FILE: Final = "manifest.json"
_STATE_PREFIX = "state-"
_STATE_SUFFIX = ".safetensors"
_GROUPS = ("params", "exp_avg", "exp_avg_sq", "grads")
_FINGERPRINT_BYTES = 1 << 20  # per weights file: its first and last MiB enter the fingerprint


class BaseModelIdentity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a checkpoint's base model was: readable fields plus digests of config and weights."""

    name: str  # the model folder's name (informational: a renamed folder is the same model)
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    config_sha256: str  # of config.json without volatile keys (_name_or_path, transformers_version)
    weights_fingerprint: str  # SHA-256 over each weights file's name, size, first and last MiB


class RngState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``random.Random`` state (``getstate()``) as plain JSON data."""

    version: int
    internal: list[int]
    gauss_next: float | None


class TenantProgress(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a tenant's experiment stands after ``step`` completed steps (0: initial eval done)."""

    step: int
    rng: RngState  # the problem stream's RNG after step ``step``: the data position
    accuracy_start: float
    started_at: float  # wall clock of the original start
    tokens_sampled: int
    records: list[dict[str, Any]]  # StepRecords of steps 1..step, as builtins


class CheckpointManifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: Literal["clora.checkpoint.format"]
    format_version: int
    tenant: str
    step: int
    adapter_version: int
    created_at: float
    base_model: BaseModelIdentity
    lora: LoraConfig
    optim: OptimConfig
    adam_step: int
    grad_weight: float
    grad_normalize: str | None
    tensors_file: str
    tensors_bytes: int
    tensors_sha256: str
    state_digest: str  # see state_digest(); checked against the trainer's store after a restore
    progress: TenantProgress


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint read back and verified: its manifest and the store state it holds."""

    path: Path
    manifest: CheckpointManifest
    state: StoreState


class _Header(msgspec.Struct, kw_only=True):
    format: str = ""
    format_version: int = -1


# ----------------------------------------------------------------------------- identity, rng, digest


def base_model_identity(model_dir: str | Path) -> BaseModelIdentity:
    """Identity of a HF model folder: config fields and digests (reads config.json, samples weights)."""
    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"base model {str(root)!r}: cannot read config.json ({e})") from None
    stable = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    text = config.get("text_config", config)
    fingerprint = hashlib.sha256()
    for weights in sorted(root.glob("*.safetensors")):
        size = weights.stat().st_size
        fingerprint.update(f"{weights.name}:{size}:".encode())
        with weights.open("rb") as f:
            fingerprint.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(0, size - _FINGERPRINT_BYTES))
            fingerprint.update(f.read(_FINGERPRINT_BYTES))
    return BaseModelIdentity(
        name=root.resolve().name,
        model_type=str(config.get("model_type", "")),
        hidden_size=int(text.get("hidden_size", -1)),
        num_layers=int(text.get("num_hidden_layers", -1)),
        vocab_size=int(text.get("vocab_size", -1)),
        config_sha256=hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
        weights_fingerprint=fingerprint.hexdigest(),
    )


def rng_state(rng: random.Random) -> RngState:
    version, internal, gauss_next = rng.getstate()
    return RngState(version=version, internal=list(internal), gauss_next=gauss_next)


def restore_rng(state: RngState) -> random.Random:
    rng = random.Random()
    try:
        rng.setstate((state.version, tuple(state.internal), state.gauss_next))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint RNG state is invalid: {e}") from None
    return rng


def _named_tensors(state: StoreState) -> dict[str, torch.Tensor]:
    """The state's tensors under group prefixes; ``grads`` only while a gradient is accumulated."""
    groups = {"params": state.params, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}
    if state.grad_normalize is not None:
        groups["grads"] = state.grads
    return {f"{group}/{k}": t.detach().to("cpu", torch.float32).contiguous()
            for group, tensors in groups.items() for k, t in tensors.items()}


def state_digest(state: StoreState) -> str:
    """SHA-256 over every tensor's name, shape and raw fp32 bytes, in name order (bit-for-bit identity)."""
    digest = hashlib.sha256()
    for name, t in sorted(_named_tensors(state).items()):
        digest.update(f"{name}:{tuple(t.shape)}:".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    write_bytes_atomically(path, data, durable=True)


def write_checkpoint(
    folder: str | Path, state: StoreState, progress: TenantProgress, base_model: BaseModelIdentity
) -> tuple[Path, int]:
    """Write ``state`` and ``progress`` as the folder's checkpoint; returns (manifest path, bytes written)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".*{TMP_SUFFIX}"):  # temp files of a writer that died
        stale.unlink(missing_ok=True)
    tensors = _named_tensors(state)
    blob = save_safetensors(tensors, metadata={"format": FORMAT, "tenant": state.tenant})
    sha = hashlib.sha256(blob).hexdigest()
    tensors_file = f"{_STATE_PREFIX}{sha[:12]}{_STATE_SUFFIX}"
    _write_atomically(root / tensors_file, blob)
    manifest = CheckpointManifest(
        format=FORMAT, format_version=FORMAT_VERSION, tenant=state.tenant, step=progress.step,
        adapter_version=state.version, created_at=time.time(), base_model=base_model, lora=state.lora,
        optim=state.optim, adam_step=state.adam_step, grad_weight=state.grad_weight,
        grad_normalize=state.grad_normalize, tensors_file=tensors_file, tensors_bytes=len(blob),
        tensors_sha256=sha, state_digest=state_digest(state), progress=progress,
    )
    encoded = msgspec.json.format(msgspec.json.encode(manifest), indent=1)
    _write_atomically(root / MANIFEST_FILE, encoded)  # the commit point
    for old in root.glob(f"{_STATE_PREFIX}*{_STATE_SUFFIX}"):
        if old.name != tensors_file:
            old.unlink(missing_ok=True)
    return root / MANIFEST_FILE, len(blob) + len(encoded)


def remove_checkpoint(folder: str | Path) -> bool:
    """Delete a checkpoint folder's files (manifest first, so a crash midway leaves no checkpoint)."""
    root = Path(folder)
    if not root.is_dir():
        return False
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    for f in root.iterdir():
        if f.is_file() and (f.name.startswith(_STATE_PREFIX) or f.name.endswith(TMP_SUFFIX)):
            f.unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------- reading


def has_checkpoint(folder: str | Path) -> bool:
    """A committed checkpoint exists (its manifest; temp files alone are not one)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path) -> CheckpointManifest:
    """The folder's manifest, decoded and checked for format and version (tensors not read)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {str(Path(folder))!r}: {MANIFEST_FILE} is missing") from None
    try:
        header = msgspec.json.decode(raw, type=_Header)
    except msgspec.DecodeError as e:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is corrupt or truncated: {e}") from None
    if header.format != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a clora checkpoint manifest (format {header.format!r})")
    if header.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format_version {header.format_version}; this clora reads {FORMAT_VERSION}"
        )
    try:
        return msgspec.json.decode(raw, type=CheckpointManifest)
    except msgspec.DecodeError as e:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is invalid: {e}") from None


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and verify a checkpoint: manifest, tensor file size and SHA-256, tensor names and shapes."""
    root = Path(folder)
    manifest = read_manifest(root)
    tensors_path = root / manifest.tensors_file
    if Path(manifest.tensors_file).name != manifest.tensors_file:
        raise CheckpointError(f"checkpoint {str(root)!r}: tensors_file {manifest.tensors_file!r} is not a file name")
    try:
        blob = tensors_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(root)!r}: tensor file {manifest.tensors_file} is missing") from None
    if len(blob) != manifest.tensors_bytes:
        raise CheckpointError(
            f"checkpoint {str(root)!r}: {manifest.tensors_file} is truncated or altered: "
            f"{len(blob)} bytes, the manifest says {manifest.tensors_bytes}"
        )
    if hashlib.sha256(blob).hexdigest() != manifest.tensors_sha256:
        raise CheckpointError(f"checkpoint {str(root)!r}: {manifest.tensors_file} fails its SHA-256 check (corrupt)")
    try:
        named = load_safetensors(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(root)!r}: {manifest.tensors_file} is unreadable: {e}") from None
    state = _state_from(named, manifest, where=f"checkpoint {str(root)!r}")
    if state_digest(state) != manifest.state_digest:
        raise CheckpointError(f"checkpoint {str(root)!r}: tensor contents do not match the manifest's state_digest")
    return Checkpoint(path=root, manifest=manifest, state=state)


def _state_from(named: Mapping[str, torch.Tensor], manifest: CheckpointManifest, where: str) -> StoreState:
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _GROUPS}
    for name, t in named.items():
        group, _, key = name.partition("/")
        if group not in groups or not key:
            raise CheckpointError(f"{where}: unexpected tensor {name!r}")
        groups[group][key] = t
    params = groups["params"]
    if not params:
        raise CheckpointError(f"{where}: holds no adapter weights")
    expected = ["exp_avg", "exp_avg_sq"] + (["grads"] if manifest.grad_normalize is not None else [])
    for group in expected:
        got = groups[group]
        if set(got) != set(params) or any(got[k].shape != params[k].shape for k in params):
            raise CheckpointError(f"{where}: {group} tensors do not match the adapter weights")
    if manifest.grad_normalize is None:
        if groups["grads"]:
            raise CheckpointError(f"{where}: holds gradients but the manifest says none are accumulated")
        groups["grads"] = {k: torch.zeros_like(t) for k, t in params.items()}
    return StoreState(
        tenant=manifest.tenant, lora=manifest.lora, optim=manifest.optim, version=manifest.adapter_version,
        adam_step=manifest.adam_step, grad_weight=manifest.grad_weight, grad_normalize=manifest.grad_normalize,
        params=params, exp_avg=groups["exp_avg"], exp_avg_sq=groups["exp_avg_sq"], grads=groups["grads"],
    )


def checkpoint_steps(run_dir: str | Path, tenants: Iterable[str]) -> dict[str, int | None]:
    """The step of each tenant's committed checkpoint under ``<run_dir>/tenants/<name>/checkpoint``
    (None: there is one but its manifest is unreadable); tenants without one are left out."""
    found: dict[str, int | None] = {}
    for name in tenants:
        folder = Path(run_dir) / "tenants" / name / "checkpoint"
        if has_checkpoint(folder):
            try:
                found[name] = read_manifest(folder).step
            except CheckpointError:
                found[name] = None
    return found
