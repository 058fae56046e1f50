"""``clora bench sampler``: rollout-shaped decoding with clora's grouped CPU LoRA ops vs vLLM's own.

One engine per op set (``CLORA_VLLM_CPU_LORA_OPS`` = 1, then 0), the same requests on each:
the arithmetic tool-use prompts (system prompt + one solved example + a question, ~240 tokens),
greedy, up to ``max_tokens`` per turn with the tool stop string, all in flight at once. Cases:
base model only, one adapter, and K adapters mixed in one batch. Adapters are random PEFT LoRAs
(rank 8, all linear layers). Each case runs on adapters (or prompts) the engine has not seen,
so prefix caching starts cold every time; ``rounds`` repeats pick the fastest.
``ratio`` = vLLM's time / clora's time (above 1: the grouped ops are faster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from clora.sampler.cpu_lora_ops import ENV_FLAG

__all__ = ["SamplerBenchRow", "bench_sampler", "format_rows", "main"]

SIZES: dict[str, dict[str, object]] = {
    "quick": {"model": "tiny", "prompts": 4, "adapters": 2, "max_tokens": 8, "rounds": 1},
    "default": {"model": "smollm2", "prompts": 24, "adapters": 4, "max_tokens": 32, "rounds": 2},
}


@dataclass(frozen=True)
class SamplerBenchRow:
    ops: str  # "clora-grouped" or "vllm"
    case: str  # "base", "1 adapter", "K adapters"
    requests: int
    tokens: int  # completion tokens
    seconds: float  # best round, all requests in flight at once
    tokens_per_s: float


async def _one_engine(model: str, ops_on: bool, *, prompts: int, adapters: int, max_tokens: int,
                      rounds: int, dtype: str, work: Path) -> list[SamplerBenchRow]:
    from transformers import AutoTokenizer

    from clora.rl.chat import ChatRenderer
    from clora.config import EngineConfig, ModelConfig
    from clora.sampler.engine import Engine
    from clora.envs.arithmetic import ArithmeticEnv
    from clora.envs.tools import TOOL_STOP_SEQUENCES
    from clora.messages import SamplingSpec
    from clora.models import random_lora_adapter, resolve_model

    model_cfg = ModelConfig(source=model, dtype=dtype, max_model_len=1024)
    model_dir = resolve_model(model_cfg)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(model_dir))
    env = ArithmeticEnv(difficulty=0, held_out_size=prompts * (rounds * 3 + 1), seed=11)
    problems = env.held_out()
    count = 1 + adapters  # per round: one for the single-adapter case, K for the mixed case
    paths = [random_lora_adapter(model_dir, work / f"adapter{i}", seed=i) for i in range(count * rounds)]
    spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, stop=TOOL_STOP_SEQUENCES)
    engine_cfg = EngineConfig(max_loras=adapters + 1, max_cpu_loras=len(paths) + 1, kv_cache_gib=1.0,
                              extra_env={ENV_FLAG: "1" if ops_on else "0"})
    engine = await Engine.start(model_dir, model_cfg, engine_cfg, work_dir=work / "engine")
    label = "clora-grouped" if ops_on else "vllm"
    try:
        ids = {}
        for i, path in enumerate(paths):
            ids[i] = engine.allocate_adapter_id()
            await engine.add_adapter(f"bench{i}", ids[i], path)

        def adapter(i: int):
            return f"bench{i}", ids[i], paths[i]

        warmup = renderer.initial(env.start(problems[-1]).initial_messages())
        await engine.generate(warmup, spec, None)  # the first request pays one-off engine set-up
        best: dict[str, tuple[float, int, int]] = {}
        for r in range(rounds):
            fresh = problems[(3 * r) * prompts : (3 * r + 3) * prompts]  # unseen prompts: a cold prefix cache
            first = count * r
            cases = {
                "base": [(p, None) for p in fresh[:prompts]],
                "1 adapter": [(p, adapter(first)) for p in fresh[prompts : 2 * prompts]],
                f"{adapters} adapters": [
                    (p, adapter(first + 1 + k)) for k in range(adapters) for p in fresh[2 * prompts : 3 * prompts]
                ],
            }
            for case, requests in cases.items():
                started = time.perf_counter()
                outs = await asyncio.gather(*(
                    engine.generate(renderer.initial(env.start(p).initial_messages()), spec, a) for p, a in requests
                ))
                seconds = time.perf_counter() - started
                tokens = sum(len(o.completions[0].token_ids) for o in outs)
                if case not in best or seconds < best[case][0]:
                    best[case] = (seconds, tokens, len(requests))
        return [SamplerBenchRow(label, case, n, tokens, round(s, 2), round(tokens / s, 1))
                for case, (s, tokens, n) in best.items()]
    finally:
        engine.shutdown()


async def bench_sampler(model: str = "smollm2", *, prompts: int = 24, adapters: int = 4, max_tokens: int = 32,
                        rounds: int = 2, dtype: str = "bfloat16") -> list[SamplerBenchRow]:
    """Rows for both op sets; each engine is started with the flag in its environment, then shut down."""
    rows: list[SamplerBenchRow] = []
    for ops_on in (True, False):
        with tempfile.TemporaryDirectory(prefix="clora-bench-sampler-") as tmp:
            rows += await _one_engine(model, ops_on, prompts=prompts, adapters=adapters, max_tokens=max_tokens,
                                      rounds=rounds, dtype=dtype, work=Path(tmp))
    return rows


def format_rows(rows: list[SamplerBenchRow]) -> str:
    vllm = {r.case: r for r in rows if r.ops == "vllm"}
    lines = ["| ops | case | requests | tokens | seconds | tok/s | ratio (vllm s / this s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = vllm[r.case].seconds / r.seconds if r.case in vllm and r.seconds > 0 else float("nan")
        lines.append(f"| {r.ops} | {r.case} | {r.requests} | {r.tokens} | {r.seconds:.2f} | {r.tokens_per_s:.1f} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clora bench sampler", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="quick: tiny model, seconds")
    parser.add_argument("--model", help="'smollm2', 'tiny' or a HF model directory")
    parser.add_argument("--prompts", type=int, help="requests per adapter and case")
    parser.add_argument("--adapters", type=int, help="K adapters in the mixed case")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    settings = dict(SIZES[args.size])
    for key in ("model", "prompts", "adapters", "max_tokens", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key in ("prompts", "adapters", "max_tokens", "rounds"):
        if int(settings[key]) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rows = asyncio.run(bench_sampler(dtype=args.dtype, **settings))  # type: ignore[arg-type]
    print(f"settings: {settings}, dtype {args.dtype}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
