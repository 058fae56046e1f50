"""AdamW and gradient clipping as pure functions on plain tensors (no torch.optim state).

They reproduce ``torch.optim.AdamW`` (single-tensor path, decoupled weight decay; with
weight_decay=0 that is ``torch.optim.Adam``) and ``torch.nn.utils.clip_grad_norm_`` op for op,
so a tenant's update is numerically the same as torch's while the state lives in its store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clora.config import OptimConfig

__all__ = ["global_grad_norm", "clip_grads_", "adamw_step_"]


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients viewed as one vector (a 0-dim fp32 tensor)."""
    return torch.nn.utils.get_total_norm(list(grads), 2.0)  # () same kernel as clip_grad_norm_


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> bool:
    """Scale grads in place so their global norm is at most ``max_norm``; True if it scaled them."""
    clip_coef = max_norm / (total_norm + 1e-6)  # ()
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)  # ()
    for g in grads:
        g.mul_(clip_coef_clamped.to(g.device))
    return bool(clip_coef < 1.0)


def adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int,
    optim: OptimConfig,
) -> None:
    """One AdamW update in place; ``step`` is the new step count (1 for the first update)."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (count after this update), got {step}")
    lr, beta1, beta2 = optim.lr, optim.beta1, optim.beta2
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if optim.weight_decay != 0:
            param.mul_(1 - lr * optim.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(optim.eps)  # same shape as param
        param.addcdiv_(exp_avg, denom, value=-step_size)
