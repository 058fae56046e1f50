"""The model folder the engine loads: the base model's own, or a cached copy in the engine's dtype.

vLLM casts weights stored in another float dtype while it loads them, with one "Attempted to load
weight ... float32 into ... bfloat16" warning per tensor (about 130 for SmolLM2). A bf16 engine on
clora's fp32 conversion therefore gets a bf16 copy, made once and kept in the cache (the trainer keeps
loading the fp32 folder): the same numbers the cast would give, and a quiet start.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

__all__ = ["SAFETENSORS_DTYPES", "weight_dtypes", "engine_model_dir"]

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def weight_dtypes(model_dir: Path) -> set[str]:
    """The safetensors dtypes ("F32", "BF16", ...) of a model folder's tensors, from the headers only."""
    return {info["dtype"] for file in _weight_files(Path(model_dir))
            for name, info in _header(file).items() if name != "__metadata__"}


def _digest(model_dir: Path) -> str:
    """Names, sizes and times of the folder's weight files: a changed model gets a new copy."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for file in _weight_files(model_dir):
        stat = file.stat()
        h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def engine_model_dir(model_dir: Path, dtype: str, cache_dir: Path | None = None) -> Path:
    """``model_dir`` when its float weights are stored in ``dtype`` already; else a copy in ``dtype``
    under ``<cache>/engine/`` (built once, atomically, reused while the model's files are unchanged)."""
    from clora.checkpoint.atomic import build_dir_atomically
    from clora.models import default_cache_dir

    model_dir = Path(model_dir)
    want = SAFETENSORS_DTYPES[dtype]
    if weight_dtypes(model_dir) & _FLOATS <= {want}:
        return model_dir
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "engine" / f"{model_dir.name}-{dtype}-{_digest(model_dir)}"
    if not target.is_dir():
        build_dir_atomically(target, lambda tmp: _convert(model_dir, tmp, dtype))
    return target


def _convert(model_dir: Path, out: Path, dtype: str) -> None:
    """Every file of ``model_dir`` into ``out``; float tensors of the weight files cast to ``dtype``."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    weights = {f.name for f in _weight_files(model_dir)}
    for item in model_dir.iterdir():
        if item.name in weights:
            tensors = load_file(str(item))
            save_file({k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()},
                      str(out / item.name), metadata={"format": "pt"})
        elif item.name == "config.json":
            config = json.loads(item.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype
            (out / item.name).write_text(json.dumps(config, indent=2))
        elif item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
