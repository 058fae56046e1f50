"""The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (no torch import).

The trainer (import, export), the sampler (before vLLM loads an adapter) and ``clora export`` /
``clora sample`` read adapters through this module:

- ``read_peft_dir(path, error)``: the folder exists, holds both files, and its config is a JSON
  object. Weights are read as safetensors only: ``adapter_model.bin`` is pickle and never read.
- ``config_target_modules(config)``: the config's ``target_modules`` as a list.
- ``safetensors_names(path, error)``: the tensor names in a safetensors header (no tensor is loaded);
  ``adapter_version(path, error)``: the trainer's version clora wrote into the header's metadata.

Each check raises ``error`` (the caller's CloraError subclass) with a message naming the file and
what is wrong with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PICKLE_WEIGHTS_FILE",
    "PeftDir",
    "read_peft_dir",
    "config_target_modules",
    "safetensors_names",
    "safetensors_header",
    "adapter_version",
    "VERSION_METADATA",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # pickle: refused, named in the error
VERSION_METADATA = "clora_adapter_version"  # safetensors metadata: the trainer's version of the weights


class PeftDir(NamedTuple):
    """A PEFT adapter folder whose files exist and whose config parsed."""

    path: Path
    config: dict[str, Any]

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE


def read_peft_dir(path: str | Path, error: type[Exception]) -> PeftDir:
    """The folder at ``path`` with its parsed ``adapter_config.json``; ``error`` names the first problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise error(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise error(f"{str(folder)!r} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / PICKLE_WEIGHTS_FILE).is_file():
            raise error(
                f"adapter folder {str(folder)!r} has no {WEIGHTS_FILE} ({PICKLE_WEIGHTS_FILE} is pickle; "
                "clora reads only safetensors)"
            )
        raise error(f"{str(folder)!r} is not a PEFT adapter folder: {WEIGHTS_FILE} is missing")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise error(f"{str(config_file)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise error(f"{str(config_file)!r} holds {type(config).__name__}, not a JSON object")
    return PeftDir(folder, config)


def config_target_modules(config: dict[str, Any]) -> list[str]:
    """``target_modules`` of an adapter config as a list (PEFT also allows one name as a string)."""
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def safetensors_names(path: Path, error: type[Exception]) -> list[str]:
    """Tensor names from a safetensors header."""
    return [k for k in safetensors_header(path, error) if k != "__metadata__"]


def adapter_version(path: Path, error: type[Exception]) -> int | None:
    """The trainer's adapter version clora wrote into a weights file's metadata (None: not written by clora)."""
    version = (safetensors_header(path, error).get("__metadata__") or {}).get(VERSION_METADATA)
    return int(version) if isinstance(version, str) and version.isdigit() else None


def safetensors_header(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A safetensors header (8-byte little-endian length, then JSON): tensor entries and ``__metadata__``."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{str(path)!r} is not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", head)
        if size > path.stat().st_size - 8:
            raise error(f"{str(path)!r} is not a safetensors file (header length {size} too large)")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise error(f"{str(path)!r} is not a safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise error(f"{str(path)!r} is not a safetensors file (its header is not a JSON object)")
    return header
