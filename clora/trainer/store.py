"""Per-tenant adapter state on the host, and the device working copy used for one step.

``AdapterStore`` is the source of truth of a tenant: fp32 master LoRA weights (the device may
compute in bf16 under autocast; the weights it trains are these fp32 masters), Adam moments,
the accumulated gradient, and the step counter (= adapter version, 0 at creation, where
B = 0 so the adapter equals the base model). Tensors live in pinned host memory when CUDA
exists, plain memory otherwise.

A step never edits the store directly: ``swap_in`` copies what the step needs onto the
device (``WorkingCopy``), the step works on the copy, and ``write_back`` copies the result
into the store only after the step succeeded. A failed or cancelled step leaves the store as
it was.

Tensor names: ``"<module>.lora_A"`` (r, in) and ``"<module>.lora_B"`` (out, r), with the
module's name in the base model, e.g. ``model.layers.0.self_attn.q_proj.lora_A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from clora.checkpoint.compat import lora_shape_mismatch
from clora.config import LoraConfig, OptimConfig
from clora.errors import AdapterMismatchError
from clora.messages import StoreState

__all__ = [
    "lora_key",
    "initial_lora_params",
    "check_adapter_layout",
    "AdapterStore",
    "WorkingCopy",
    "swap_in",
    "write_back",
]


def lora_key(module: str, which: str) -> str:
    """Store name of a module's A or B matrix (``which`` is "A" or "B")."""
    return f"{module}.lora_{which}"


def initial_lora_params(shapes: Mapping[str, tuple[int, int]], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The pristine adapter: A kaiming-uniform (a=sqrt(5), as peft), B zeros; seeded by lora.init_seed.

    Modules are initialised in sorted name order from one generator, so the result depends
    only on the shapes and the LoraConfig.
    """
    gen = torch.Generator().manual_seed(lora.init_seed)
    params: dict[str, torch.Tensor] = {}
    for module in sorted(shapes):
        in_features, out_features = shapes[module]
        a = torch.empty(lora.rank, in_features)  # (r, in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        params[lora_key(module, "A")] = a
        params[lora_key(module, "B")] = torch.zeros(out_features, lora.rank)  # (out, r)
    return params


def _host_copy(t: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=torch.float32, pin_memory=pin_memory)
    return out.copy_(t)


@dataclass(eq=False)
class AdapterStore:
    """One tenant's adapter, optimizer state and accumulated gradient (host memory)."""

    tenant: str
    lora: LoraConfig
    optim: OptimConfig
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    params: dict[str, torch.Tensor]  # fp32 master weights
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]  # mean gradient accumulated since the last optimizer step
    grad_weight: float = 0.0  # normalisation denominator behind ``grads`` (tokens or sequences)
    grad_normalize: str | None = None  # normalisation of ``grads``; None: nothing accumulated
    step: int = 0  # adapter version: +1 per optimizer step and per imported adapter
    adam_step: int = 0  # optimizer steps since the moments were last reset (Adam's bias correction)
    pinned: bool = field(default=False)

    @classmethod
    def create(
        cls,
        tenant: str,
        lora: LoraConfig,
        optim: OptimConfig,
        shapes: Mapping[str, tuple[int, int]],
        *,
        pin_memory: bool = False,
        initial: Mapping[str, torch.Tensor] | None = None,
    ) -> AdapterStore:
        """A version-0 store; ``initial`` (store-named tensors, e.g. an imported adapter) replaces
        the seeded init and must have exactly the right names and shapes."""
        pristine = initial_lora_params(shapes, lora)
        if initial is not None:
            check_adapter_layout(pristine, initial, owner=f"tenant {tenant!r}")
            pristine = {k: initial[k] for k in pristine}
        params = {k: _host_copy(v, pin_memory) for k, v in pristine.items()}
        zeros = lambda: {k: _host_copy(torch.zeros_like(v), pin_memory) for k, v in params.items()}  # noqa: E731
        return cls(
            tenant=tenant,
            lora=lora,
            optim=optim,
            shapes=dict(shapes),
            params=params,
            exp_avg=zeros(),
            exp_avg_sq=zeros(),
            grads=zeros(),
            pinned=pin_memory,
        )

    @property
    def version(self) -> int:
        return self.step

    @property
    def modules(self) -> list[str]:
        return sorted(self.shapes)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def replace_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """New weights as the next version, with optimizer state and accumulated gradient reset.

        ``tensors`` must have exactly this store's names and shapes (checked before any write).
        """
        check_adapter_layout(self.params, tensors, owner=f"tenant {self.tenant!r}")
        for k, t in self.params.items():
            t.copy_(tensors[k])
        for part in (self.exp_avg, self.exp_avg_sq, self.grads):
            for t in part.values():
                t.zero_()
        self.grad_weight, self.grad_normalize = 0.0, None
        self.adam_step = 0
        self.step += 1

    def export_state(self) -> StoreState:
        """CPU copies of everything this store holds (for a checkpoint); safe while training goes on."""
        copy = lambda part: {k: t.detach().to("cpu", copy=True) for k, t in part.items()}  # noqa: E731
        return StoreState(
            tenant=self.tenant, lora=self.lora, optim=self.optim, version=self.step, adam_step=self.adam_step,
            grad_weight=self.grad_weight, grad_normalize=self.grad_normalize, params=copy(self.params),
            exp_avg=copy(self.exp_avg), exp_avg_sq=copy(self.exp_avg_sq), grads=copy(self.grads),
        )

    def load_state(self, state: StoreState) -> int:
        """Take over a StoreState (a restored checkpoint) whole: weights, moments, gradient, counters.

        The state must have this store's LoRA shape (rank, alpha, targets) and exactly its tensor
        names and shapes; everything is checked before the first write. Returns the version.
        """
        owner = f"checkpoint state for tenant {self.tenant!r}"
        ours, theirs = self.lora, state.lora
        mismatch = lora_shape_mismatch(theirs.rank, theirs.alpha, theirs.target_modules, ours)
        if mismatch is not None:
            kind = "rank/alpha" if mismatch.field in ("rank", "alpha") else mismatch.field
            raise AdapterMismatchError(
                f"{owner}: {kind} mismatch: state rank {theirs.rank} alpha {theirs.alpha} targets "
                f"{sorted(theirs.target_modules)}, tenant rank {ours.rank} alpha {ours.alpha} targets "
                f"{sorted(ours.target_modules)}"
            )
        parts = ((self.params, state.params), (self.exp_avg, state.exp_avg), (self.exp_avg_sq, state.exp_avg_sq),
                 (self.grads, state.grads))
        for mine, given in parts:
            check_adapter_layout(mine, given, owner=owner)
        for mine, given in parts:
            for k, t in mine.items():
                t.copy_(given[k])
        self.step, self.adam_step = state.version, state.adam_step
        self.grad_weight, self.grad_normalize = state.grad_weight, state.grad_normalize
        return self.step


def check_adapter_layout(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], owner: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterMismatchError(
            f"{owner}: adapter tensors do not match the tenant's target modules "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, t in expected.items():
        if tuple(got[k].shape) != tuple(t.shape):
            raise AdapterMismatchError(
                f"{owner}: {k} has shape {tuple(got[k].shape)}, expected {tuple(t.shape)} "
                f"(rank {t.shape[0] if k.endswith('lora_A') else t.shape[1]})"
            )


@dataclass(eq=False)
class WorkingCopy:
    """Device copies of what one step of one tenant needs; discarded unless written back."""

    tenant: str
    params: dict[str, torch.Tensor]  # fp32 leaves on the device (requires_grad when training)
    exp_avg: dict[str, torch.Tensor] | None
    exp_avg_sq: dict[str, torch.Tensor] | None
    grads: dict[str, torch.Tensor] | None  # accumulated gradient (copy of the store's)
    grad_weight: float
    grad_normalize: str | None
    step: int
    adam_step: int


def _to_device(tensors: Mapping[str, torch.Tensor], device: torch.device, non_blocking: bool) -> dict[str, torch.Tensor]:
    return {k: t.to(device, copy=True, non_blocking=non_blocking) for k, t in tensors.items()}


def swap_in(
    store: AdapterStore,
    device: torch.device,
    *,
    trainable: bool = False,
    optim_state: bool = False,
    grads: bool = False,
) -> WorkingCopy:
    """Copy the store's weights (and optionally optimizer state and gradients) onto ``device``."""
    nb = store.pinned and device.type == "cuda"
    params = _to_device(store.params, device, nb)
    if trainable:
        for t in params.values():
            t.requires_grad_(True)
    work = WorkingCopy(
        tenant=store.tenant,
        params=params,
        exp_avg=_to_device(store.exp_avg, device, nb) if optim_state else None,
        exp_avg_sq=_to_device(store.exp_avg_sq, device, nb) if optim_state else None,
        grads=_to_device(store.grads, device, nb) if grads else None,
        grad_weight=store.grad_weight,
        grad_normalize=store.grad_normalize,
        step=store.step,
        adam_step=store.adam_step,
    )
    if nb:
        torch.cuda.current_stream(device).synchronize()
    return work


def _copy_into(dst: dict[str, torch.Tensor], src: Mapping[str, torch.Tensor]) -> None:
    for k, t in dst.items():
        t.copy_(src[k].detach())


def write_back(store: AdapterStore, work: WorkingCopy, *, params: bool, optim_state: bool, grads: bool) -> None:
    """Copy a finished step's results into the store (blocking copies; call only after success)."""
    if work.tenant != store.tenant:
        raise ValueError(f"working copy of {work.tenant!r} cannot be written into {store.tenant!r}")
    if params:
        _copy_into(store.params, work.params)
    if optim_state:
        assert work.exp_avg is not None and work.exp_avg_sq is not None
        _copy_into(store.exp_avg, work.exp_avg)
        _copy_into(store.exp_avg_sq, work.exp_avg_sq)
    if grads:
        assert work.grads is not None
        _copy_into(store.grads, work.grads)
    store.grad_weight = work.grad_weight
    store.grad_normalize = work.grad_normalize
    store.step = work.step
    store.adam_step = work.adam_step
