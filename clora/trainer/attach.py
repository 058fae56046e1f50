"""Attach LoRA layers to a base model (HF ``LlamaForCausalLM`` or any nn.Module of nn.Linear).

Target names follow peft: a target ``"q_proj"`` matches every module whose name is
``q_proj`` or ends with ``.q_proj``. A target that matches nothing, or matches a module
that is not an ``nn.Linear``, is an ``AdapterMismatchError``; so is a rank larger than a
target layer's smaller side (the update could not be low-rank).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from clora.config import LoraConfig
from clora.errors import AdapterMismatchError
from clora.trainer.lora_layer import LoRALinear, SlotRouting

__all__ = ["find_targets", "check_lora_fits", "attach_lora", "lora_layers", "layer_shapes"]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_of(module: nn.Module) -> nn.Linear | None:
    if isinstance(module, LoRALinear):
        return module.base_layer
    return module if isinstance(module, nn.Linear) else None


def find_targets(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Linear]:
    """Module name -> base nn.Linear for every module matching one of ``target_modules``."""
    found: dict[str, nn.Linear] = {}
    linear_names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if _linear_of(m) is not None and not n.endswith(".base_layer")
        }
    )
    for target in target_modules:
        hits = [
            (name, module)
            for name, module in model.named_modules()
            if name and _matches(name, target) and not name.endswith(".base_layer")
        ]
        if not hits:
            raise AdapterMismatchError(
                f"target module {target!r} does not exist in the base model "
                f"(its linear layers are {', '.join(linear_names)})"
            )
        for name, module in hits:
            linear = _linear_of(module)
            if linear is None:
                raise AdapterMismatchError(
                    f"target module {target!r} matches {name!r}, a {type(module).__name__}, "
                    "not a linear layer"
                )
            found[name] = linear
    return found


def check_lora_fits(model: nn.Module, lora: LoraConfig) -> dict[str, nn.Linear]:
    """The targets of ``lora`` in ``model``; AdapterMismatchError if a target or the rank does not fit."""
    targets = find_targets(model, lora.target_modules)
    for name, linear in targets.items():
        limit = min(linear.in_features, linear.out_features)
        if lora.rank > limit:
            raise AdapterMismatchError(
                f"rank {lora.rank} is larger than {name} allows "
                f"({linear.in_features}->{linear.out_features}, at most {limit})"
            )
    return targets


def attach_lora(model: nn.Module, target_modules: Iterable[str], routing: SlotRouting) -> dict[str, LoRALinear]:
    """Replace every target nn.Linear by a LoRALinear sharing ``routing``; idempotent.

    Returns every LoRALinear of the model (old and new), by module name.
    """
    for name, linear in find_targets(model, target_modules).items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            if module.routing is not routing:
                raise ValueError(f"{name} already has LoRA with another routing")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, routing))
    return lora_layers(model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def layer_shapes(targets: Mapping[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features)."""
    return {name: (lin.in_features, lin.out_features) for name, lin in targets.items()}
