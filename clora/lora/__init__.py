"""LoRA on a frozen base model: slot layers, per-tenant stores, AdamW, PEFT files, training core."""

from clora.lora.adam import adamw_step_, clip_grads_, global_grad_norm
from clora.lora.attach import attach_lora, check_lora_fits, find_targets, layer_shapes, lora_layers
from clora.lora.core import TrainerCore, resolve_device
from clora.lora.fused import FusedRequest, fused_train_step
from clora.lora.layer import LoRALinear, LoRASlot, RowMode, SlotRouting
from clora.lora.peft_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_peft_config,
    export_peft,
    import_peft,
    peft_config_dict,
    peft_key,
    peft_state_dict,
    read_peft,
    store_key,
)
from clora.lora.store import AdapterStore, WorkingCopy, initial_lora_params, lora_key, swap_in, write_back

__all__ = [
    "adamw_step_",
    "clip_grads_",
    "global_grad_norm",
    "attach_lora",
    "check_lora_fits",
    "find_targets",
    "layer_shapes",
    "lora_layers",
    "TrainerCore",
    "resolve_device",
    "FusedRequest",
    "fused_train_step",
    "LoRALinear",
    "RowMode",
    "LoRASlot",
    "SlotRouting",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "check_peft_config",
    "export_peft",
    "import_peft",
    "peft_config_dict",
    "peft_key",
    "peft_state_dict",
    "read_peft",
    "store_key",
    "AdapterStore",
    "WorkingCopy",
    "initial_lora_params",
    "lora_key",
    "swap_in",
    "write_back",
]
