"""A model folder and PEFT adapters on disk, checked before vLLM sees them (no vLLM import).

- ``check_model_len``: ``model.max_model_len`` must fit the model's max_position_embeddings.
- ``check_adapter``: a PEFT adapter folder (clora.checkpoint.peft_dir: safetensors weights, never
  ``adapter_model.bin``, which is pickle) that the engine can serve (rank, target modules).
- ``write_zero_adapter``: the all-zero adapter that serves base-model rows (see clora.sampler.engine).
"""

from __future__ import annotations

import json
from pathlib import Path

from clora.checkpoint.peft_dir import CONFIG_FILE, WEIGHTS_FILE, config_target_modules, read_peft_dir
from clora.errors import AdapterMismatchError, ConfigError

__all__ = ["LLAMA_LORA_MODULES", "check_model_len", "check_adapter", "write_zero_adapter"]

# Linear modules vLLM can put a LoRA on in llama-family models (what an adapter may target).
LLAMA_LORA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)


def check_model_len(model_dir: Path, max_model_len: int) -> None:
    """ConfigError when ``model.max_model_len`` exceeds the base model's max_position_embeddings
    (checked before vLLM starts, which would fail later and less clearly)."""
    config_file = Path(model_dir) / "config.json"
    try:
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return  # no readable config.json: resolve_model / vLLM report that themselves
    if isinstance(limit, int) and max_model_len > limit:
        raise ConfigError(
            f"model.max_model_len: {max_model_len} exceeds the base model's max_position_embeddings {limit} "
            f"({config_file})"
        )


def check_adapter(path: Path, *, max_rank: int) -> None:
    """Raise AdapterMismatchError when the PEFT adapter at ``path`` cannot be served."""
    config = read_peft_dir(path, AdapterMismatchError).config
    rank = int(config.get("r", 0))
    if rank > max_rank:
        raise AdapterMismatchError(f"adapter {str(path)!r} has rank {rank} > engine.max_lora_rank {max_rank}")
    targets = config_target_modules(config)
    unknown = sorted(t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES)
    if unknown:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} targets modules the base model does not have: {unknown}; "
            f"supported: {sorted(LLAMA_LORA_MODULES)}"
        )


def write_zero_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A rank-1 PEFT adapter whose weights are all zero: LoRA rows that equal the base model.

    It targets layer 0's q_proj only; vLLM zeroes a slot's other modules, so every layer adds 0.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    q_out = config["num_attention_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(1, hidden),  # [r, in]
        f"{prefix}.lora_B.weight": torch.zeros(q_out, 1),  # [out, r]
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / WEIGHTS_FILE)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "bias": "none", "base_model_name_or_path": str(model_dir),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
    return out_dir
