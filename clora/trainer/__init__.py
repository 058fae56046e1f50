"""LoRA on a frozen base model: slot layers, per-tenant stores, AdamW, PEFT files, training core."""

from clora.trainer.optimizer import adamw_step_, clip_grads_, global_grad_norm
from clora.trainer.attach import attach_lora, check_lora_fits, find_targets, layer_shapes, lora_layers
from clora.trainer.core import TrainerCore, resolve_device
from clora.trainer.fused import FusedRequest, fused_train_step
from clora.trainer.lora_layer import LoRALinear, LoRASlot, RowMode, SlotRouting
from clora.checkpoint.peft_dir import CONFIG_FILE, WEIGHTS_FILE
from clora.trainer.peft_io import (
    check_peft_config,
    export_peft,
    import_peft,
    peft_config_dict,
    peft_key,
    peft_state_dict,
    read_peft,
    store_key,
)
from clora.trainer.schedule import check_schedule, scheduled_lr
from clora.trainer.store import AdapterStore, WorkingCopy, initial_lora_params, lora_key, swap_in, write_back

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
    "check_schedule",
    "scheduled_lr",
    "AdapterStore",
    "WorkingCopy",
    "initial_lora_params",
    "lora_key",
    "swap_in",
    "write_back",
]
