"""A tenant's adapter as PEFT files (the folder format: clora.checkpoint.peft_dir).

The files are what ``peft.PeftModel.from_pretrained`` and vLLM's LoRARequest load unchanged:
tensor names ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r), fp32. Import reads safetensors only (never pickle) and checks the adapter against
the tenant it is meant for; any difference is an ``AdapterMismatchError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clora.checkpoint.atomic import write_atomically
from clora.checkpoint.compat import lora_shape_mismatch
from clora.checkpoint.peft_dir import CONFIG_FILE, VERSION_METADATA, WEIGHTS_FILE, read_peft_dir
from clora.config import LoraConfig
from clora.errors import AdapterMismatchError, ModelNotFoundError
from clora.trainer.store import AdapterStore, check_adapter_layout, initial_lora_params

__all__ = [
    "peft_key",
    "store_key",
    "peft_config_dict",
    "peft_state_dict",
    "export_peft",
    "read_peft",
    "check_peft_config",
    "import_peft",
]

_PEFT_KEYS = {"rank": "r", "alpha": "lora_alpha", "target modules": "target_modules"}  # adapter_config.json's names
_PREFIX = "base_model.model."
_SUFFIX = ".weight"


def peft_key(key: str) -> str:
    """Store name -> PEFT name: ``m.lora_A`` -> ``base_model.model.m.lora_A.weight``."""
    return f"{_PREFIX}{key}{_SUFFIX}"


def store_key(name: str) -> str:
    """PEFT name -> store name; AdapterMismatchError for names that are not LoRA A/B weights."""
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        raise AdapterMismatchError(f"adapter tensor {name!r} is not a PEFT LoRA weight name")
    key = name[len(_PREFIX) : -len(_SUFFIX)]
    if not (key.endswith(".lora_A") or key.endswith(".lora_B")):
        raise AdapterMismatchError(f"adapter tensor {name!r} is not a lora_A/lora_B weight (unsupported)")
    return key


def peft_config_dict(lora: LoraConfig, base_model_name: str | None) -> dict[str, Any]:
    """The adapter_config.json content for a plain LoRA (no dropout, bias, DoRA or rsLoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": sorted(lora.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def peft_state_dict(store: AdapterStore) -> dict[str, torch.Tensor]:
    """PEFT-named CPU copies of the store's weights (safe to keep while training goes on)."""
    return {peft_key(k): t.detach().to("cpu", copy=True).contiguous() for k, t in store.params.items()}


def export_peft(
    tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], out_dir: str | Path,
    *, version: int | None = None,
) -> Path:
    """Write PEFT-named ``tensors`` and ``peft_config`` into ``out_dir``; each file is replaced
    atomically, weights first, so a reader never sees a half-written file. ``version`` (the trainer's
    adapter version) goes into the safetensors metadata, where ``clora sample`` reads it back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **({VERSION_METADATA: str(version)} if version is not None else {})}
    write_atomically(out / WEIGHTS_FILE, lambda p: save_file(dict(tensors), p, metadata=metadata))
    write_atomically(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(dict(peft_config), indent=2) + "\n"))
    return out


def read_peft(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config dict and store-named tensors of a PEFT directory (safetensors only)."""
    folder = read_peft_dir(path, ModelNotFoundError)
    tensors = {store_key(name): t for name, t in load_file(str(folder.weights_file)).items()}
    return folder.config, tensors


def _same_model_name(a: str, b: str) -> bool:
    norm = lambda s: Path(str(s).rstrip("/")).name.lower()  # noqa: E731
    return norm(a) == norm(b)


def check_peft_config(config: Mapping[str, Any], lora: LoraConfig, base_model_name: str | None, where: str) -> None:
    """AdapterMismatchError naming the first difference between an adapter_config and ``lora``."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora", "lora_bias"):
        if config.get(flag):
            raise AdapterMismatchError(f"{where}: {flag}=true is not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise AdapterMismatchError(f"{where}: per-module {pattern} is not supported")
    targets = config.get("target_modules")
    mismatch = lora_shape_mismatch(
        config.get("r"), config.get("lora_alpha", -1), targets if isinstance(targets, list) else None, lora
    )
    if mismatch is not None:
        field, theirs, ours = mismatch
        shown = targets if field == "target modules" else theirs  # as the file has it
        raise AdapterMismatchError(f"{where}: {field} mismatch: adapter {_PEFT_KEYS[field]}={shown!r}, tenant {field}={ours}")
    theirs = config.get("base_model_name_or_path")
    if theirs and base_model_name and not _same_model_name(theirs, base_model_name):
        raise AdapterMismatchError(
            f"{where}: base model mismatch: adapter was trained on {theirs!r}, this base is {base_model_name!r}"
        )


def import_peft(
    path: str | Path,
    lora: LoraConfig,
    shapes: Mapping[str, tuple[int, int]],
    base_model_name: str | None,
) -> dict[str, torch.Tensor]:
    """Store-named fp32 tensors of the PEFT adapter at ``path``, checked against the tenant's
    ``lora`` config and target layer ``shapes`` (module -> (in, out))."""
    config, tensors = read_peft(path)
    where = f"adapter {str(path)!r}"
    check_peft_config(config, lora, base_model_name, where)
    expected = initial_lora_params(shapes, lora)  # names and shapes only
    check_adapter_layout(expected, tensors, owner=where)
    return {k: t.float() for k, t in tensors.items()}
