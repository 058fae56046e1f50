"""Fused vs swapped multi-tenant training: train time per tenant-step for K = 1, 2, 4, 8 tenants.

``bench_fused()`` adds K tenants (ranks cycling 8, 16, 4, 8, alpha = 2 x rank) to one TrainerCore
and times rounds in which every tenant takes one TrainStep of ``sequences`` random sequences
(PPO loss on on-policy sampler log-probs): *swapped* = K single-adapter steps one after the
other (swap in, step, swap out), *fused* = one ``train_steps_fused`` call. Fused rows are
timed for each LoRA row mode ("grouped": each slot on its own rows; "gathered": ranks padded
to the largest and A/B gathered per row). ``ratio`` = swapped / fused time per tenant-step
(> 1: fusion is faster). The modes run interleaved, round by round, and each row reports
the median round, so a shared machine's changing load affects every mode alike; ``swap_s`` is the
part of a round spent swapping stores in and out, ``peak_gb`` the device memory peak (CUDA).
``add_bench_tenants`` and ``time_group`` are the pieces, also used by ``clora.bench.gpu`` on a
model it builds itself. ``python -m clora.bench.fused`` prints the table (``--size quick`` runs
the tiny model in seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from clora.bench.trainer import _on_policy, _random_data
from clora.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, TrainerConfig

if TYPE_CHECKING:
    from clora.trainer import FusedRequest, TrainerCore

__all__ = ["FusedBenchRow", "SIZES", "add_bench_tenants", "bench_fused", "format_rows", "main", "time_group"]

RANK_CYCLE = (8, 16, 4, 8)

SIZES: dict[str, dict[str, object]] = {
    "quick": {"model": "tiny", "tenant_counts": (1, 2, 4), "sequences": 2, "seq_len": 32, "steps": 2, "warmup": 1},
    "default": {"model": "smollm2", "tenant_counts": (1, 2, 4, 8), "sequences": 2, "seq_len": 128, "steps": 3,
                "warmup": 1},
}


@dataclass(frozen=True)
class FusedBenchRow:
    tenants: int  # K
    mode: str  # "swapped" or "fused"
    row_mode: str  # LoRA routing of mixed batches ("-" for swapped: one slot per batch)
    sequences: int  # per tenant and step
    seq_len: int
    micro_batch_size: int
    steps: int  # measured rounds (after warmup); a round = one TrainStep of every tenant
    round_s: float  # median wall time of a round (modes are interleaved round by round)
    tenant_step_s: float  # round_s / K
    tokens_per_s: float
    ratio: float  # swapped tenant_step_s / this row's (1.0 for swapped)
    torch_threads: int
    swap_s: float = 0.0  # median per round of the steps' swap-in + swap-out time (inside round_s)
    peak_gb: float | None = None  # most device memory allocated during a measured round (CUDA only)


def add_bench_tenants(
    core: TrainerCore, count: int, *, sequences: int, seq_len: int, prompt_len: int = 0, seed: int = 0
) -> list[FusedRequest]:
    """``count`` tenants (ranks cycling RANK_CYCLE, alpha = 2 x rank) and one TrainStep request
    each: ``sequences`` random sequences (one rollout group sharing a ``prompt_len``-token prompt
    when > 0), PPO loss on the trainer's own log-probs (on-policy)."""
    from clora.trainer import FusedRequest

    vocab = core.model.config.vocab_size
    loss = LossConfig(kind="ppo")
    requests = []
    for i in range(count):
        rank = RANK_CYCLE[i % len(RANK_CYCLE)]
        tenant = f"bench-{i}"
        core.add_tenant(tenant, LoraConfig(rank=rank, alpha=2.0 * rank, init_seed=i), OptimConfig(lr=1e-5))
        raw = _random_data(vocab, sequences, seq_len, seed + i, prompt_len=prompt_len)
        requests.append(FusedRequest(tenant, _on_policy(raw, core.compute_logprobs(tenant, raw)), loss))
    return requests


def time_group(
    core: TrainerCore,
    group: list[FusedRequest],
    *,
    steps: int,
    warmup: int,
    row_modes: tuple[str, ...] = ("grouped",),
) -> list[FusedBenchRow]:
    """Swapped and fused (once per row mode) rows for one group of K = len(group) tenants."""
    import torch

    cuda = core.device.type == "cuda"

    def swapped() -> float:
        return sum(_swap_s(core.train_step(r.tenant, r.data, r.loss)) for r in group)

    def fused() -> float:
        outcomes = core.train_steps_fused(group)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return _swap_s(outcomes[0])  # time/* of a fused step are the whole group's

    k = len(group)
    sequences, seq_len = len(group[0].data), len(group[0].data[0].tokens)
    runs = [("swapped", "-", swapped)] + [("fused", mode, fused) for mode in row_modes]
    times: dict[str, list[float]] = {row_mode: [] for _, row_mode, _ in runs}
    swaps: dict[str, list[float]] = {row_mode: [] for _, row_mode, _ in runs}
    peaks: dict[str, float] = {}
    for i in range(warmup + steps):  # modes interleaved round by round: a shared machine's load hits all alike
        for _, row_mode, run in runs:
            core.routing.mode = row_mode if row_mode != "-" else "grouped"
            if cuda:
                torch.cuda.synchronize(core.device)
                torch.cuda.reset_peak_memory_stats(core.device)
            start = time.perf_counter()
            swap_s = run()
            if cuda:
                torch.cuda.synchronize(core.device)
            if i >= warmup:
                times[row_mode].append(time.perf_counter() - start)
                swaps[row_mode].append(swap_s)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(core.device) / 1e9
                    peaks[row_mode] = max(peaks.get(row_mode, 0.0), peak)
    core.routing.mode = "grouped"
    base = statistics.median(times["-"])
    rows = []
    for mode, row_mode, _ in runs:
        round_s = statistics.median(times[row_mode])
        rows.append(FusedBenchRow(
            tenants=k, mode=mode, row_mode=row_mode, sequences=sequences, seq_len=seq_len,
            micro_batch_size=core.micro_batch_size, steps=steps, round_s=round_s, tenant_step_s=round_s / k,
            tokens_per_s=k * sequences * seq_len / round_s, ratio=base / round_s,
            torch_threads=torch.get_num_threads(), swap_s=statistics.median(swaps[row_mode]),
            peak_gb=peaks.get(row_mode),
        ))
    return rows


def _swap_s(values: dict[str, float]) -> float:
    return values["time/swap_in"] + values["time/swap_out"]


def bench_fused(
    model: ModelConfig = ModelConfig(),
    *,
    tenant_counts: tuple[int, ...] = (1, 2, 4, 8),
    sequences: int = 2,
    seq_len: int = 128,
    micro_batch_size: int = 8,
    steps: int = 2,
    warmup: int = 1,
    row_modes: tuple[str, ...] = ("grouped",),
    num_threads: int | None = None,
    seed: int = 0,
) -> list[FusedBenchRow]:
    """Swapped and fused rows for each K in ``tenant_counts`` (fused once per row mode)."""
    import torch

    from clora.trainer import TrainerCore
    from clora.models import resolve_model

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    core = TrainerCore.from_model_dir(resolve_model(model), TrainerConfig(micro_batch_size=micro_batch_size))
    requests = add_bench_tenants(core, max(tenant_counts), sequences=sequences, seq_len=seq_len, seed=seed)
    rows = []
    for k in tenant_counts:
        rows += time_group(core, requests[:k], steps=steps, warmup=warmup, row_modes=row_modes)
    return rows


def format_rows(rows: list[FusedBenchRow]) -> str:
    peaks = any(r.peak_gb is not None for r in rows)
    lines = [f"{'K':>2} {'mode':<8} {'rows':<8} {'round s':>8} {'s/tenant-step':>13} {'tok/s':>7} {'ratio':>6} "
             f"{'swap s':>7}" + (f" {'peak GB':>8}" if peaks else "")]
    for r in rows:
        peak = "" if not peaks else f" {r.peak_gb:>8.2f}" if r.peak_gb is not None else f" {'-':>8}"
        lines.append(
            f"{r.tenants:>2} {r.mode:<8} {r.row_mode:<8} {r.round_s:>8.3f} {r.tenant_step_s:>13.3f} "
            f"{r.tokens_per_s:>7.0f} {r.ratio:>6.2f} {r.swap_s:>7.3f}{peak}"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"{r.sequences} x {r.seq_len} tokens per tenant-step, micro-batch {r.micro_batch_size}, ranks cycle "
            f"{RANK_CYCLE}, {r.steps} measured rounds, {r.torch_threads} torch threads; ratio = swapped / fused"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--model", default=None, help="'smollm2', 'tiny' or a HF model directory")
    parser.add_argument("--tenants", type=int, nargs="+", default=None, help="values of K")
    parser.add_argument("--sequences", type=int, default=None, help="sequences per tenant-step")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--row-modes", nargs="+", choices=["grouped", "gathered"], default=["grouped"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    pick = lambda name, value: value if value is not None else size[name]  # noqa: E731
    rows = bench_fused(
        ModelConfig(source=pick("model", args.model)),
        tenant_counts=tuple(pick("tenant_counts", args.tenants)),
        sequences=pick("sequences", args.sequences),
        seq_len=pick("seq_len", args.seq_len),
        micro_batch_size=args.micro_batch_size,
        steps=pick("steps", args.steps),
        warmup=pick("warmup", args.warmup),
        row_modes=tuple(args.row_modes),
        num_threads=args.threads,
    )
    if args.json:
        import json

        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        print(format_rows(rows))


if __name__ == "__main__":
    main()
