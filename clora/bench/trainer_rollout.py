"""Trainer benchmark on rollout-shaped data: the naive path vs shared-prefix training, side by side.

The data look like one RL step's: ``groups`` problems x ``group_size`` samples; every sequence
starts with the same system prompt + worked example (``system_len`` tokens), each group shares its
question (``question_len``), and each sample is a multi-turn completion of about
``completion_len`` tokens (lengths drawn from 0.75-1.25 x) with a tool-result turn of ``tool_len``
tokens inside it (not trained). Tokens are random ids: only the shapes matter for time.

Modes, measured interleaved step by step on one TrainerCore (one tenant per mode, same data):
``naive`` (``shared_prefix`` off: every row through the whole model, logits everywhere),
``logits_only`` (shared path with nothing shared: LM head only where needed) and ``shared``
(prefixes computed once too). Per mode: mean time per TrainStep, the trainer's own token counts
(``tokens_computed`` = positions run through the model, padding included, over trained tokens) and
peak memory of the step (CUDA: peak allocated above the step's start; CPU: peak resident size
above the step's start, polled every 10 ms after returning free heap to the OS).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clora.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, TrainerConfig
from clora.messages import Datum

if TYPE_CHECKING:
    from clora.trainer import TrainerCore

__all__ = ["RolloutShape", "RolloutBenchRow", "StepTiming", "MODES", "rollout_data", "bench_rollout", "bench_rollout_core",
           "format_rollout"]

MODES = ("naive", "logits_only", "shared")
_NEVER = 1 << 30  # prefix_min_tokens that shares nothing


@dataclass(frozen=True)
class RolloutShape:
    groups: int = 4
    group_size: int = 6
    system_len: int = 220  # shared by every sequence of the step
    question_len: int = 20  # shared by a group
    completion_len: int = 40  # mean; each drawn from 0.75-1.25 x
    tool_len: int = 8  # tool-result turn inside each completion, not trained; 0: single turn


@dataclass(frozen=True)
class RolloutBenchRow:
    mode: str
    precision: str
    step_s: float  # mean wall time of one TrainStep
    cpu_s: float  # mean CPU time of the process during one TrainStep (all threads; robust to other load)
    fwd_bwd_s: float
    speedup: float  # naive step_s / this step_s (0.0 when naive was not measured)
    tokens_trained: float
    tokens_computed: float
    computed_per_trained: float
    lm_head_positions: float
    peak_mem_gb: float
    mem_kind: str  # "cuda allocated" or "cpu rss"
    sequences: int
    micro_batch_size: int
    steps: int
    torch_threads: int


@dataclass(frozen=True)
class StepTiming:
    """One timed TrainStep of one mode, as it happens (for progress output)."""

    precision: str
    mode: str
    step: int  # 0-based, warm-up steps first
    warmup: bool
    seconds: float
    cpu_seconds: float
    tokens_computed: float
    tokens_trained: float


StepCallback = Callable[[StepTiming], None]


def rollout_data(vocab: int, shape: RolloutShape, seed: int = 0) -> list[Datum]:
    """One step's data of ``shape``; a group's samples are consecutive, advantages +-1 within a group."""
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(shape.system_len)]
    data = []
    for _ in range(shape.groups):
        prompt = system + [rng.randrange(vocab) for _ in range(shape.question_len)]
        for i in range(shape.group_size):
            n = max(2, round(shape.completion_len * rng.uniform(0.75, 1.25)))
            mask = [1.0] * n
            if 0 < shape.tool_len < n - 2:  # assistant turn, tool result, assistant turn
                start = rng.randint(1, n - shape.tool_len - 1)
                mask[start : start + shape.tool_len] = [0.0] * shape.tool_len
            loss_mask = [0.0] * len(prompt) + mask
            adv = 1.0 if i % 2 == 0 else -1.0
            data.append(Datum(
                tokens=prompt + [rng.randrange(vocab) for _ in range(n)],
                loss_mask=loss_mask,
                advantages=[adv * m for m in loss_mask],
                sampler_logprobs=[0.0] * len(loss_mask),
            ))
    return data


def bench_rollout(
    model: ModelConfig = ModelConfig(),
    *,
    precisions: Sequence[str] = ("fp32",),
    modes: Sequence[str] = MODES,
    shape: RolloutShape = RolloutShape(),
    rank: int = 8,
    micro_batch_size: int = 8,
    steps: int = 3,
    warmup: int = 1,
    num_threads: int | None = None,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> list[RolloutBenchRow]:
    """Load ``model`` into a TrainerCore and run ``bench_rollout_core`` once per precision."""
    import torch

    from clora.trainer import TrainerCore
    from clora.models import resolve_model

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    core = TrainerCore.from_model_dir(resolve_model(model), TrainerConfig(micro_batch_size=micro_batch_size))
    rows = []
    for precision in precisions:
        rows += bench_rollout_core(core, precision=precision, modes=modes, shape=shape, rank=rank, steps=steps,
                                   warmup=warmup, seed=seed, on_step=on_step)
    return rows


def bench_rollout_core(
    core: TrainerCore,
    *,
    precision: str = "fp32",
    modes: Sequence[str] = MODES,
    shape: RolloutShape = RolloutShape(),
    rank: int = 8,
    steps: int = 3,
    warmup: int = 1,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> list[RolloutBenchRow]:
    """Time ``modes`` on ``core`` (its model, device, micro-batch size), interleaved step by step.

    ``on_step(StepTiming)`` is called after every timed step, warm-up included, so a caller can show
    progress long before the table (a naive SmolLM2 step takes minutes on a small CPU).
    """
    import torch

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not core.shared_prefix and set(modes) - {"naive"}:
        raise ValueError(f"the shared path is off for this model: {core.prefix_off_reason}")
    saved = (core.shared_prefix, core.prefix_min_tokens, core.autocast_bf16)
    core.autocast_bf16 = precision == "bf16"
    lora, optim, loss = LoraConfig(rank=rank, alpha=2.0 * rank), OptimConfig(lr=1e-5), LossConfig(kind="ppo")
    raw = rollout_data(core.vocab_size or core.model.config.vocab_size, shape, seed)
    runs: dict[str, list[tuple[float, dict[str, float], float]]] = {m: [] for m in modes}
    try:
        for mode in modes:
            core.add_tenant(f"rollout-{mode}", lora, optim)
        data = [  # on-policy sampler log-probs (importance ratio 1 at the first step)
            Datum(tokens=d.tokens, loss_mask=d.loss_mask, advantages=d.advantages, sampler_logprobs=lp)
            for d, lp in zip(raw, core.compute_logprobs(f"rollout-{modes[0]}", raw), strict=True)
        ]
        for i in range(warmup + steps):
            for mode in modes:
                core.shared_prefix = mode != "naive"
                core.prefix_min_tokens = _NEVER if mode == "logits_only" else saved[1]
                cpu_start = time.process_time()
                seconds, values, peak = _timed_step(core, f"rollout-{mode}", data, loss)
                cpu_seconds = time.process_time() - cpu_start
                if on_step is not None:
                    on_step(StepTiming(precision=precision, mode=mode, step=i, warmup=i < warmup, seconds=seconds,
                                       cpu_seconds=cpu_seconds, tokens_computed=values["tokens_computed"],
                                       tokens_trained=values["tokens"]))
                if i >= warmup:
                    runs[mode].append((seconds, values | {"cpu_s": cpu_seconds}, peak))
    finally:
        core.shared_prefix, core.prefix_min_tokens, core.autocast_bf16 = saved
        for mode in modes:
            if f"rollout-{mode}" in core.stores:
                core.remove_tenant(f"rollout-{mode}")
    naive_s = statistics.fmean(t for t, _, _ in runs["naive"]) if "naive" in runs else 0.0
    rows = []
    for mode in modes:
        mean = lambda key, m=mode: statistics.fmean(v[key] for _, v, _ in runs[m])  # noqa: E731
        step_s = statistics.fmean(t for t, _, _ in runs[mode])
        rows.append(RolloutBenchRow(
            mode=mode, precision=precision, step_s=step_s, cpu_s=mean("cpu_s"), fwd_bwd_s=mean("time/fwd_bwd"),
            speedup=naive_s / step_s if naive_s else 0.0, tokens_trained=mean("tokens"),
            tokens_computed=mean("tokens_computed"), computed_per_trained=mean("tokens_computed") / mean("tokens"),
            lm_head_positions=mean("tokens_lm_head"), peak_mem_gb=max(p for _, _, p in runs[mode]) / 1e9,
            mem_kind="cuda allocated" if core.device.type == "cuda" else "cpu rss", sequences=len(data),
            micro_batch_size=core.micro_batch_size, steps=steps, torch_threads=torch.get_num_threads(),
        ))
    return rows


def _timed_step(core: TrainerCore, tenant: str, data: list[Datum], loss: LossConfig) -> tuple[float, dict, float]:
    """(seconds, step values, peak bytes above the step's start) of one TrainStep."""
    import torch

    from clora.bench.rss import PeakRss
    from clora.trainer.memory import release_free_memory

    if core.device.type == "cuda":
        torch.cuda.synchronize(core.device)
        torch.cuda.reset_peak_memory_stats(core.device)
        base = torch.cuda.memory_allocated(core.device)
        start = time.perf_counter()
        values = core.train_step(tenant, data, loss)
        torch.cuda.synchronize(core.device)
        return time.perf_counter() - start, values, torch.cuda.max_memory_allocated(core.device) - base
    release_free_memory()
    with PeakRss(interval_s=0.01) as peak:
        base = peak.bytes
        start = time.perf_counter()
        values = core.train_step(tenant, data, loss)
        seconds = time.perf_counter() - start
    return seconds, values, peak.bytes - base


def format_rollout(rows: list[RolloutBenchRow], shape: RolloutShape) -> str:
    header = (f"{'precision':<9} {'mode':<11} {'step s':>7} {'cpu s':>7} {'fwd_bwd s':>9} {'speedup':>7} {'computed':>8} "
              f"{'trained':>7} {'comp/train':>10} {'lm head':>7} {'peak GB':>7}")
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.precision:<9} {r.mode:<11} {r.step_s:>7.2f} {r.cpu_s:>7.2f} {r.fwd_bwd_s:>9.2f} {r.speedup:>6.2f}x "
            f"{r.tokens_computed:>8.0f} {r.tokens_trained:>7.0f} {r.computed_per_trained:>10.2f} "
            f"{r.lm_head_positions:>7.0f} {r.peak_mem_gb:>7.2f}"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"{shape.groups} groups x {shape.group_size} samples = {r.sequences} sequences: prompt "
            f"{shape.system_len} shared + {shape.question_len} per group, completions ~{shape.completion_len} "
            f"tokens with a {shape.tool_len}-token tool turn; micro-batch {r.micro_batch_size}, {r.steps} measured "
            f"steps per mode (interleaved), {r.torch_threads} torch threads; peak memory = {r.mem_kind} above the "
            "step's start; cpu s = the process's CPU time per step (all threads: less sensitive to other load "
            "than wall time)"
        )
    return "\n".join(lines)
