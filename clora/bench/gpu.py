"""GPU benchmark of the trainer on a randomly initialised model of a real model's shape (no download).

For one shape (``SHAPES``: Qwen3-4B, Qwen3-0.6B, or a tiny one for the CPU dry run) it builds the
model from a transformers config with random bf16 weights directly on the device, wraps it in a
TrainerCore (bf16 autocast, fp32 LoRA masters) and measures, in this order:

1. ``swap``: one tenant's whole store (weights, Adam moments, gradient) swapped in and written
   back, from pinned and from pageable host memory, beside one flat copy of the same bytes (the
   link's rate without per-tensor overhead);
2. ``fused``: one LoRA TrainStep per tenant, swapped (K single-adapter steps) vs fused (one
   forward/backward), for K = 1, 2, 4, 8 tenants with rollout-shaped data (each tenant: one group
   of ``sequences`` completions of one shared prompt), via clora.bench.fused's ``time_group``;
   each row has its device memory peak, so ``memory`` gives the peak per added tenant.

Results go to a JSON file after every measurement (a killed run keeps what finished), and a
``--budget-s`` stops before a tenant count that would not fit. ``python -m clora.bench.gpu
--shape qwen3-4b --out FILE`` (``clora bench gpu``); scripts/gpu_check.sh runs it per shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clora.trainer import TrainerCore

__all__ = ["SHAPES", "WORKLOADS", "Workload", "build_model", "run", "time_swaps", "main"]

_QWEN3 = dict(model_type="qwen3", tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6)
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-4B(-Instruct-2507): 36 layers, hidden 2560, GQA 32/8 heads of 128, 4.02B parameters
    "qwen3-4b": _QWEN3 | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # Qwen3-0.6B: 28 layers, hidden 1024, GQA 16/8 heads of 128, 0.6B parameters
    "qwen3-0.6b": _QWEN3 | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # the CPU dry run: same architecture, seconds on 2 cores
    "tiny": _QWEN3 | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=512),
}


@dataclass(frozen=True)
class Workload:
    """What one tenant-step trains and how often it is timed."""

    tenant_counts: tuple[int, ...] = (1, 2, 4, 8)
    sequences: int = 8  # per tenant-step: one rollout group (G completions of one prompt)
    prompt_len: int = 256  # shared by the group, not trained
    completion_len: int = 256  # trained
    micro_batch_size: int = 16  # rows per forward: two tenants' groups per fused micro-batch
    row_modes: tuple[str, ...] = ("grouped", "gathered")
    steps: int = 3  # measured rounds per K
    warmup: int = 1
    swap_repeats: int = 5

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len


WORKLOADS: dict[str, Workload] = {
    "qwen3-4b": Workload(),
    "qwen3-0.6b": Workload(),
    "tiny": Workload(tenant_counts=(1, 2), sequences=2, prompt_len=8, completion_len=8, micro_batch_size=4,
                     steps=1, warmup=0, swap_repeats=2),
}


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    """A causal LM of ``shape`` with random bf16 weights, created on ``device`` (no host copy)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_swaps(core: TrainerCore, tenant: str, repeats: int) -> list[dict[str, Any]]:
    """swap_in + write_back of ``tenant``'s whole store, pinned (where CUDA exists) and pageable."""
    import torch

    from clora.trainer import AdapterStore, swap_in, write_back

    own = core.store(tenant)
    stores = {"pinned": own} if own.pinned else {}
    stores["pageable"] = AdapterStore.create(tenant, own.lora, own.optim, own.shapes, pin_memory=False)
    rows = []
    for memory, store in stores.items():
        parts = (store.params, store.exp_avg, store.exp_avg_sq, store.grads)
        tensors = sum(len(p) for p in parts)
        nbytes = sum(t.numel() * t.element_size() for p in parts for t in p.values())
        ins, outs, flats = [], [], []
        # the same bytes as one tensor: the link's rate without per-tensor overhead
        flat = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=memory == "pinned")
        for _ in range(repeats):
            _sync(core.device)
            start = time.perf_counter()
            work = swap_in(store, core.device, trainable=True, optim_state=True, grads=True)
            _sync(core.device)
            swapped = time.perf_counter()
            write_back(store, work, params=True, optim_state=True, grads=True)
            _sync(core.device)
            ins.append(swapped - start)
            outs.append(time.perf_counter() - swapped)
            start = time.perf_counter()
            flat.to(core.device, copy=True, non_blocking=memory == "pinned")
            _sync(core.device)
            flats.append(time.perf_counter() - start)
            del work
        swap_in_s, write_back_s, flat_s = (statistics.median(x) for x in (ins, outs, flats))
        rows.append({
            "memory": memory, "tensors": tensors, "mb": nbytes / 1e6, "repeats": repeats,
            "swap_in_ms": swap_in_s * 1e3, "write_back_ms": write_back_s * 1e3, "one_tensor_ms": flat_s * 1e3,
            "swap_in_gbps": nbytes / swap_in_s / 1e9, "write_back_gbps": nbytes / write_back_s / 1e9,
            "one_tensor_gbps": nbytes / flat_s / 1e9,
        })
    return rows


def memory_summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Device memory peak per added tenant, from the fused (grouped) and swapped rows: the slope of
    the peak between the smallest K >= 2 and the largest K measured (K = 1 fuses nothing)."""
    out: dict[str, float | None] = {}
    for key, mode, row_mode in (("fused", "fused", "grouped"), ("swapped", "swapped", "-")):
        peaks = {r["tenants"]: r["peak_gb"] for r in rows
                 if r["mode"] == mode and r["row_mode"] == row_mode and r.get("peak_gb") is not None}
        ks = sorted(k for k in peaks if k >= 2)
        slope = (peaks[ks[-1]] - peaks[ks[0]]) / (ks[-1] - ks[0]) if len(ks) >= 2 else None
        out[f"{key}_peak_gb_per_added_tenant"] = slope
    return out


class _Results:
    """The run's JSON, rewritten atomically after every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        from clora.bench.gpu_check import loaded_distributions, refused_imports

        self.data["imports"], self.data["refused"] = loaded_distributions(), refused_imports()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _env(device: torch.device) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 1e9,
                "capability": f"{props.major}.{props.minor}"}
    return env


def run(shape: str, out: Path, *, device: str = "auto", workload: Workload | None = None,
        budget_s: float | None = None) -> dict[str, Any]:
    """Measure ``shape`` into ``out`` (JSON, saved as it goes); returns the final data."""
    began = time.perf_counter()
    work = workload or WORKLOADS[shape]
    results = _Results(out, {"shape": shape, "config": SHAPES[shape], "workload": asdict(work),
                             "status": "started", "swap": [], "fused": [], "errors": []})
    data = results.data
    try:
        import torch

        from clora.bench.fused import add_bench_tenants, time_group
        from clora.trainer import TrainerCore, resolve_device

        dev = resolve_device(device)
        data["env"] = _env(dev)
        results.save()
        start = time.perf_counter()
        model = build_model(shape, dev)
        _sync(dev)
        data["model"] = {"init_s": time.perf_counter() - start, "params": sum(p.numel() for p in model.parameters()),
                         "dtype": "bfloat16"}
        if dev.type == "cuda":
            data["model"]["device_gb"] = torch.cuda.memory_allocated(dev) / 1e9
        core = TrainerCore(model, device=dev, autocast_bf16=True, micro_batch_size=work.micro_batch_size)
        start = time.perf_counter()
        requests = add_bench_tenants(core, max(work.tenant_counts), sequences=work.sequences,
                                     seq_len=work.seq_len, prompt_len=work.prompt_len)
        data["model"]["tenants_setup_s"] = time.perf_counter() - start
        store = core.store(requests[0].tenant)
        data["model"]["store_mb_per_tenant"] = sum(
            t.numel() * 4 for p in (store.params, store.exp_avg, store.exp_avg_sq, store.grads) for t in p.values()
        ) / 1e6
        results.save()
        data["swap"] = time_swaps(core, requests[0].tenant, work.swap_repeats)
        results.save()
        previous: tuple[int, float] | None = None  # (K, seconds its measurement took)
        for k in work.tenant_counts:
            if budget_s is not None and previous is not None:
                estimate = previous[1] * k / previous[0]
                if time.perf_counter() - began + estimate > budget_s:
                    data["errors"].append(f"K={k} skipped: ~{estimate:.0f} s would pass the {budget_s:.0f} s budget")
                    break
            start = time.perf_counter()
            try:
                rows = time_group(core, requests[:k], steps=work.steps, warmup=work.warmup, row_modes=work.row_modes)
            except torch.cuda.OutOfMemoryError as exc:
                data["errors"].append(f"K={k}: out of memory: {str(exc).splitlines()[0]}")
                torch.cuda.empty_cache()
                break
            data["fused"] += [asdict(r) for r in rows]
            data["memory"] = memory_summary(data["fused"])
            previous = (k, time.perf_counter() - start)
            results.save()
        data["status"] = "done"
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, then re-raised for the exit code
        data["status"] = "failed"
        data["errors"].append("".join(traceback.format_exception(exc)))
        raise
    finally:
        data["wall_s"] = time.perf_counter() - began
        results.save()
    return data


def main(argv: list[str] | None = None) -> int:
    from clora.bench.gpu_check import guard_imports_if_asked

    guard_imports_if_asked()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (as results come)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cuda', 'cpu', ...")
    parser.add_argument("--budget-s", type=float, default=None, help="skip tenant counts that would pass this")
    parser.add_argument("--tenants", type=int, nargs="+", default=None, help="values of K")
    parser.add_argument("--sequences", type=int, default=None, help="sequences per tenant-step (one group)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--completion-len", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {"tenant_counts": tuple(args.tenants) if args.tenants else None, "sequences": args.sequences,
                 "prompt_len": args.prompt_len, "completion_len": args.completion_len,
                 "micro_batch_size": args.micro_batch_size, "steps": args.steps}
    workload = dataclasses.replace(WORKLOADS[args.shape], **{k: v for k, v in overrides.items() if v is not None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = run(args.shape, args.out, device=args.device, workload=workload, budget_s=args.budget_s)
    from clora.bench.gpu_report import format_bench

    print(format_bench(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
