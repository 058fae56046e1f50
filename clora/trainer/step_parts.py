"""The parts of a training call that the single-tenant path (clora.trainer.core) and the fused
multi-tenant path (clora.trainer.fused) share, so neither reaches into the other's internals:

- ``bound_slots``: bind tenants' working copies into LoRA slots of every layer, unbind afterwards;
- ``check_normalize``: a call's normalisation against the tenant's accumulated gradient;
- ``merge_grads``: fold a call's fresh ``.grad`` into the tenant's accumulated gradient;
- ``apply_optimizer``: clip, check and apply AdamW at the tenant's scheduled LR;
- ``PhaseTimer``: wall time of named phases (the ``time/*`` step metrics).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from clora.config import LossConfig, OptimConfig
from clora.errors import ConfigError, NonFiniteError
from clora.trainer.attach import lora_layers
from clora.trainer.lora_layer import SlotRouting
from clora.trainer.optimizer import adamw_step_, clip_grads_, global_grad_norm
from clora.trainer.schedule import scheduled_lr
from clora.trainer.store import AdapterStore, WorkingCopy, lora_key

__all__ = ["PhaseTimer", "apply_optimizer", "bound_slots", "check_normalize", "merge_grads"]


@contextmanager
def bound_slots(
    model: nn.Module, routing: SlotRouting, bindings: Sequence[tuple[AdapterStore, WorkingCopy]]
) -> Iterator[None]:
    """Bind binding i's weights into slot i of every layer it targets (and clear slot i of the
    others); the caller routes rows. Unbinds every slot and clears the routing afterwards."""
    layers = lora_layers(model)
    try:
        for slot, (store, work) in enumerate(bindings):
            for name, layer in layers.items():
                if name in store.shapes:
                    a, b = work.params[lora_key(name, "A")], work.params[lora_key(name, "B")]
                    layer.set_slot(slot, a, b, store.lora.scaling)
                else:
                    layer.clear_slot(slot)
        yield
    finally:
        routing.clear()
        for layer in layers.values():
            for slot in range(len(bindings)):
                layer.clear_slot(slot)


def check_normalize(store: AdapterStore, loss: LossConfig) -> None:
    """ConfigError for normalize="constant" without its constant, or a normalisation other than the
    one the tenant's accumulated gradient (since its last OptimStep) was made with."""
    if loss.normalize == "constant" and loss.normalize_constant is None:
        raise ConfigError(
            f"tenant {store.tenant!r}: loss.normalize_constant: normalize='constant' needs it (tokens per "
            "sequence to divide by; an experiment uses its max_tokens)"
        )
    if store.grad_normalize not in (None, loss.normalize):
        raise ConfigError(
            f"tenant {store.tenant!r}: gradients accumulated with normalize={store.grad_normalize!r} "
            f"cannot be mixed with normalize={loss.normalize!r} before the next OptimStep"
        )


def merge_grads(store: AdapterStore, work: WorkingCopy, denominator: float, normalize: str) -> None:
    """Check the fresh ``.grad`` of ``work.params`` and fold it into ``work.grads`` as a mean
    weighted by the normalisation denominator; clears ``.grad``."""
    assert work.grads is not None
    new_grads = [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in (work.params[k] for k in work.grads)
    ]
    if not torch.isfinite(global_grad_norm(new_grads)):
        raise NonFiniteError(
            f"tenant {store.tenant!r}: non-finite gradient; step rejected, adapter stays at version {store.version}"
        )
    total = work.grad_weight + denominator
    if total > 0:
        for acc, new in zip(work.grads.values(), new_grads, strict=True):
            acc.mul_(work.grad_weight / total).add_(new, alpha=denominator / total)
    for p in work.params.values():
        p.grad = None
    work.grad_weight, work.grad_normalize = total, normalize


def apply_optimizer(store: AdapterStore, work: WorkingCopy, optim: OptimConfig | None = None) -> dict[str, float]:
    """Clip, check and apply AdamW at the tenant's scheduled LR to ``work`` (``optim``'s instead of the
    tenant's hyperparameters when given); reset its accumulated gradient."""
    optim = store.optim if optim is None else optim
    assert work.grads is not None and work.exp_avg is not None and work.exp_avg_sq is not None
    keys = list(work.params)
    grads = [work.grads[k] for k in keys]
    grad_norm = global_grad_norm(grads)  # ()
    if not torch.isfinite(grad_norm):
        raise NonFiniteError(
            f"tenant {store.tenant!r}: non-finite gradient norm; step rejected, "
            f"adapter stays at version {store.version}"
        )
    clipped = False
    if optim.grad_clip > 0:  # 0 turns clipping off
        clipped = clip_grads_(grads, optim.grad_clip, grad_norm)
    lr = scheduled_lr(optim, work.adam_step)
    with torch.no_grad():
        params = [work.params[k].detach() for k in keys]
        adamw_step_(
            params, grads, [work.exp_avg[k] for k in keys], [work.exp_avg_sq[k] for k in keys],
            work.adam_step + 1, optim, lr=lr,
        )
        if not all(torch.isfinite(p).all() for p in params):
            raise NonFiniteError(
                f"tenant {store.tenant!r}: the update made weights non-finite; step rejected, "
                f"adapter stays at version {store.version}"
            )
        for g in grads:
            g.zero_()
    work.step += 1
    work.adam_step += 1
    work.grad_weight, work.grad_normalize = 0.0, None
    return {"grad_norm": float(grad_norm), "grad_clipped": float(clipped), "lr": lr}


class PhaseTimer:
    """Wall time of named phases, in seconds."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.values[key] = self.values.get(key, 0.0) + time.perf_counter() - start
