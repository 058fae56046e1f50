"""Trainer step benchmark: time split of one LoRA train step (swap-in, fwd/bwd, optim, swap-out).

``bench_trainer()`` runs TrainerCore on a base model (default: the real SmolLM2-135M) with
random token sequences, on-policy sampler log-probs (computed once) and a PPO loss, in fp32
and with bf16 autocast, and returns one ``TrainerBenchResult`` per precision.
``python -m clora.bench.trainer`` prints the table (the CLI wires it as ``clora bench trainer``).
``--workload rollout`` instead runs clora.bench.trainer_rollout: RL-step-shaped data (groups sharing a
prompt, multi-turn completions), the naive path vs shared-prefix training side by side.
"""

from __future__ import annotations

import argparse
import sys
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Literal

from clora.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, TrainerConfig
from clora.messages import Datum

__all__ = ["TrainerBenchResult", "bench_trainer", "format_results", "main"]

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainerBenchResult:
    precision: str
    rank: int
    sequences: int
    seq_len: int
    steps: int  # measured steps (after warmup)
    step_s: float  # mean wall time of one TrainStep
    swap_in_s: float
    fwd_bwd_s: float
    optim_s: float
    swap_out_s: float
    swap_share: float  # (swap_in + swap_out) / step
    tokens_per_s: float
    adapter_params: int
    torch_threads: int
    max_rss_gb: float


def _random_data(vocab: int, sequences: int, seq_len: int, seed: int, *, prompt_len: int = 0) -> list[Datum]:
    """Random sequences with alternating advantages +1/-1, every token but the first trained. With
    ``prompt_len`` > 0 they are one rollout group: the first ``prompt_len`` tokens are one prompt
    shared by all of them and not trained, the rest are each sequence's own completion."""
    if not 0 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len must be in [0, seq_len), got {prompt_len} for seq_len {seq_len}")
    rng = random.Random(seed)
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    untrained = max(prompt_len, 1)  # index 0 is never trained (nothing predicts it)
    data = []
    for i in range(sequences):
        adv = 1.0 if i % 2 == 0 else -1.0
        data.append(Datum(
            tokens=prompt + [rng.randrange(vocab) for _ in range(seq_len - prompt_len)],
            loss_mask=[0.0] * untrained + [1.0] * (seq_len - untrained),
            advantages=[adv] * seq_len,
            sampler_logprobs=[0.0] * seq_len,
        ))
    return data


def _on_policy(data: list[Datum], logprobs: list[list[float]]) -> list[Datum]:
    """Use the trainer's own log-probs as the sampler's (ratio 1 at the first step, as in on-policy RL)."""
    return [
        Datum(tokens=d.tokens, loss_mask=d.loss_mask, advantages=d.advantages, sampler_logprobs=lp)
        for d, lp in zip(data, logprobs, strict=True)
    ]


def bench_trainer(
    model: ModelConfig = ModelConfig(),
    *,
    precisions: tuple[Precision, ...] = ("fp32", "bf16"),
    rank: int = 8,
    sequences: int = 8,
    seq_len: int = 256,
    steps: int = 3,
    warmup: int = 1,
    num_threads: int | None = None,
    seed: int = 0,
) -> list[TrainerBenchResult]:
    """Mean time split of ``steps`` TrainSteps (after ``warmup``) for each precision."""
    import torch

    from clora.trainer import TrainerCore
    from clora.models import resolve_model

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    core = TrainerCore.from_model_dir(resolve_model(model), TrainerConfig(micro_batch_size=sequences))
    vocab = core.model.config.vocab_size
    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    results = []
    for precision in precisions:
        core.autocast_bf16 = precision == "bf16"
        tenant = f"bench-{precision}"
        store = core.add_tenant(tenant, lora, OptimConfig(lr=1e-5))
        raw = _random_data(vocab, sequences, seq_len, seed)
        data = _on_policy(raw, core.compute_logprobs(tenant, raw))
        runs = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            values = core.train_step(tenant, data, LossConfig(kind="ppo"))
            if i >= warmup:
                runs.append((time.perf_counter() - start, values))
        mean = lambda key: statistics.fmean(v[key] for _, v in runs)  # noqa: E731
        step_s = statistics.fmean(t for t, _ in runs)
        results.append(TrainerBenchResult(
            precision=precision, rank=rank, sequences=sequences, seq_len=seq_len, steps=steps,
            step_s=step_s, swap_in_s=mean("time/swap_in"), fwd_bwd_s=mean("time/fwd_bwd"),
            optim_s=mean("time/optim"), swap_out_s=mean("time/swap_out"),
            swap_share=(mean("time/swap_in") + mean("time/swap_out")) / step_s,
            tokens_per_s=sequences * seq_len / step_s, adapter_params=store.num_params(),
            torch_threads=torch.get_num_threads(),
            max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        ))
        core.remove_tenant(tenant)
    return results


def format_results(results: list[TrainerBenchResult]) -> str:
    header = (f"{'precision':<9} {'step s':>7} {'swap_in ms':>10} {'fwd_bwd s':>9} {'optim ms':>8} "
              f"{'swap_out ms':>11} {'swap %':>7} {'tok/s':>7} {'RSS GB':>6}")
    lines = [header]
    for r in results:
        lines.append(
            f"{r.precision:<9} {r.step_s:>7.2f} {r.swap_in_s * 1e3:>10.2f} {r.fwd_bwd_s:>9.2f} "
            f"{r.optim_s * 1e3:>8.2f} {r.swap_out_s * 1e3:>11.2f} {r.swap_share * 100:>6.3f}% "
            f"{r.tokens_per_s:>7.0f} {r.max_rss_gb:>6.2f}"
        )
    if results:
        r = results[0]
        lines.append(f"rank {r.rank}, {r.sequences} x {r.seq_len} tokens, {r.adapter_params} adapter params, "
                     f"{r.steps} measured steps, {r.torch_threads} torch threads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a HF model directory")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object per precision")
    rollout = parser.add_argument_group("--workload rollout")
    parser.add_argument("--workload", choices=["random", "rollout"], default="random",
                        help="random: --sequences x --seq-len random tokens; rollout: groups sharing a prompt")
    rollout.add_argument("--modes", nargs="+", default=None, help="naive logits_only shared (default: all)")
    rollout.add_argument("--groups", type=int, default=4)
    rollout.add_argument("--group-size", type=int, default=6)
    rollout.add_argument("--system-len", type=int, default=220, help="prompt tokens shared by every sequence")
    rollout.add_argument("--question-len", type=int, default=20, help="prompt tokens shared by a group")
    rollout.add_argument("--completion-len", type=int, default=40, help="mean completion tokens (0.75-1.25 x)")
    rollout.add_argument("--tool-len", type=int, default=8, help="tool-result tokens inside a completion (0: none)")
    rollout.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    if args.workload == "rollout":
        _main_rollout(args, precisions)
        return
    results = bench_trainer(
        ModelConfig(source=args.model), precisions=precisions, rank=args.rank, sequences=args.sequences,
        seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, num_threads=args.threads,
    )
    if args.json:
        import json

        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(format_results(results))


def _main_rollout(args: argparse.Namespace, precisions: tuple[str, ...]) -> None:
    from clora.bench.trainer_rollout import MODES, RolloutShape, bench_rollout, format_rollout

    shape = RolloutShape(
        groups=args.groups, group_size=args.group_size, system_len=args.system_len, question_len=args.question_len,
        completion_len=args.completion_len, tool_len=args.tool_len,
    )
    rows = bench_rollout(
        ModelConfig(source=args.model), precisions=precisions, modes=tuple(args.modes or MODES), shape=shape,
        rank=args.rank, micro_batch_size=args.micro_batch_size, steps=args.steps, warmup=args.warmup,
        num_threads=args.threads, on_step=_print_step,
    )
    if args.json:
        import json

        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        print(format_rollout(rows, shape))


def _print_step(t) -> None:
    """Progress on stderr, one line per timed step, so a long run shows its figures as they come."""
    kind = "warm-up" if t.warmup else "step"
    print(f"{t.precision} {t.mode:<11} {kind} {t.step}: {t.seconds:.2f} s ({t.cpu_seconds:.2f} s CPU), "
          f"{t.tokens_computed / t.tokens_trained:.2f} computed per trained token", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
