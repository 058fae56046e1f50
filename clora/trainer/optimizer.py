"""AdamW and gradient clipping on a tenant's plain tensors, done by torch's own implementations.

``adamw_step_`` runs ``torch.optim.adamw.adamw``, the functional AdamW that ``torch.optim.AdamW.step``
itself calls (decoupled weight decay; with weight_decay=0 it is Adam), on the tenant's working
copy: the moments stay in its AdapterStore, and no optimizer object outlives a step. It takes the
multi-tensor ``foreach`` path, or the ``fused`` kernel on CUDA. Clipping matches
``torch.nn.utils.clip_grad_norm_`` (same norm kernel, same coefficient, one ``_foreach_mul_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.adamw import adamw as functional_adamw

from clora.config import OptimConfig

__all__ = ["global_grad_norm", "clip_grads_", "adamw_step_"]


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients viewed as one vector (a 0-dim fp32 tensor)."""
    return torch.nn.utils.get_total_norm(list(grads), 2.0)  # () same kernel as clip_grad_norm_


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> bool:
    """Scale grads in place so their global norm is at most ``max_norm``; True if it scaled them."""
    clip_coef = max_norm / (total_norm + 1e-6)  # ()
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)  # ()
    if grads:
        torch._foreach_mul_(list(grads), clip_coef_clamped.to(grads[0].device))
    return bool(clip_coef < 1.0)


def use_fused(device: torch.device) -> bool:
    """Whether AdamW on ``device`` takes torch's fused kernel (CUDA) rather than the foreach path."""
    return device.type == "cuda"


def adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int,
    optim: OptimConfig,
    *,
    lr: float | None = None,
) -> None:
    """One AdamW update in place; ``step`` is the new step count (1 for the first update), ``lr``
    this step's learning rate (default ``optim.lr``; a schedule passes its value)."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (count after this update), got {step}")
    params = list(params)
    if not params:
        return
    device = params[0].device
    fused = use_fused(device)
    # torch keeps one step counter per tensor and increments it in place before using it: fp32
    # counters on the device for the fused kernel, on the host otherwise (as torch.optim.AdamW does)
    counters = torch.full((len(params),), float(step - 1), dtype=torch.float32, device=device if fused else "cpu")
    functional_adamw(
        params, list(grads), list(exp_avgs), list(exp_avg_sqs), [], list(counters.unbind(0)),
        foreach=None if fused else True, fused=fused or None,
        amsgrad=False, beta1=optim.beta1, beta2=optim.beta2, lr=optim.lr if lr is None else lr,
        weight_decay=optim.weight_decay, eps=optim.eps, maximize=False,
    )
