"""Three LoRA adapters and the base model answer the same prompts in ONE mixed vLLM batch.

    python examples/sample_mixed.py                 # SmolLM2-135M-Instruct, greedy, per-tenant answers
    python examples/sample_mixed.py --measure       # + throughput (32 prompts x 64 tokens) and update latency
    python examples/sample_mixed.py --model tiny    # the tiny random model (seconds, gibberish answers)

The adapters are random (PEFT init A, B ~ N(0, b_std)), so they answer differently from the base
model: what matters is that every tenant's rows decode together and each gets its own weights.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "What is 17 times 23?",
    "Name three primary colors.", "Why is the sky blue?", "What does a CPU do?",
    "Give me three tips for staying healthy.", "Suggest a name for a bakery.",
]
TENANTS = ["alice", "bob", "carol"]


def _chat_prompts(model_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                return_dict=False)
        for q in questions
    ]


async def answer_mixed(sampler, prompts: list[list[int]], tenants: list[str | None], max_tokens: int) -> None:
    """Every tenant answers every prompt, all requests in flight at once; print answers and tokens/s."""
    from clora.messages import SampleRequest, SamplingSpec

    spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0)
    jobs = [(tenant, i) for tenant in tenants for i in range(len(prompts))]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(sampler.ask(SampleRequest(tenant=t, prompt_token_ids=prompts[i], sampling=spec)) for t, i in jobs)
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(r.completions[0].token_ids) for r in results)
    for (tenant, i), result in zip(jobs, results):
        label = tenant or "base"
        text = result.completions[0].text.strip().replace("\n", " ")
        print(f"[{label:>5} v{result.adapter_version:>2}] {QUESTIONS[i % len(QUESTIONS)][:36]:<36} -> {text[:90]}")
    print(f"\n{len(jobs)} requests ({len(tenants)} tenants incl. base) in one mixed batch: "
          f"{tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tokens/s\n")


async def measure_throughput(engine, prompts, adapters, *, max_tokens: int = 64, rounds: int = 2) -> dict[str, float]:
    """tokens/s for len(prompts) x max_tokens (ignore_eos): base only vs. adapters round-robin."""
    from clora.messages import SamplingSpec

    spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    await asyncio.gather(*(engine.generate(p, SamplingSpec(max_tokens=4), None) for p in prompts[:4]))  # warm up
    rates: dict[str, float] = {}
    for label, pick in (("base only", lambda i: None), (f"{len(adapters)} mixed adapters", lambda i: adapters[i % len(adapters)])):
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            outs = await asyncio.gather(*(engine.generate(p, spec, pick(i)) for i, p in enumerate(prompts)))
            seconds = time.perf_counter() - started
            best = max(best, sum(len(o.completions[0].token_ids) for o in outs) / seconds)
        rates[label] = best
        print(f"throughput {label:>18}: {len(prompts)} prompts x {max_tokens} tokens -> {best:.1f} tokens/s (best of {rounds})")
    return rates


async def measure_update(engine, prompts, adapters, new_weights: Path, *, repeats: int = 3) -> None:
    """In-place update of one adapter while 8 requests of the others decode: latency and token gaps."""
    from clora.messages import SamplingSpec

    spec = SamplingSpec(max_tokens=200, temperature=0.0, ignore_eos=True)
    target, others = adapters[0], adapters[1:]
    for r in range(repeats):
        stamps: list[list[float]] = [[] for _ in range(8)]
        decodes = [
            asyncio.ensure_future(engine.generate(prompts[i], spec, others[i % len(others)],
                                                  on_progress=lambda n, s=stamps[i]: s.append(time.perf_counter())))
            for i in range(8)
        ]
        while min(len(s) for s in stamps) < 20:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await engine.reload_adapter(f"{target[0]}-new{r}", target[1], new_weights)
        t1 = time.perf_counter()
        await asyncio.gather(*decodes)
        gaps = [(a, b) for s in stamps for a, b in zip(s[2:], s[3:])]  # skip the prefill steps
        normal = [b - a for a, b in gaps if b < t0] or [float("nan")]
        around = [b - a for a, b in gaps if b >= t0 and a <= t1]  # steps overlapping the update
        print(f"update {r}: add_lora(load_inplace) {1000 * (t1 - t0):.0f} ms; decode gap of other requests: "
              f"median {1000 * statistics.median(normal):.0f} ms before, worst {1000 * max(around):.0f} ms during")


async def main(args: argparse.Namespace) -> None:
    from actors import ActorSystem, Supervision
    from clora.config import EngineConfig, ModelConfig
    from clora.sampler.engine import Engine
    from clora.messages import RegisterAdapter
    from clora.models import random_lora_adapter, resolve_model
    from clora.sampler.actor import SamplerActor

    model_cfg = ModelConfig(source=args.model, dtype=args.dtype)
    engine_cfg = EngineConfig(max_loras=4, max_lora_rank=8, max_num_seqs=64, kv_cache_gib=args.kv_cache_gib)
    model_dir = resolve_model(model_cfg)
    with tempfile.TemporaryDirectory(prefix="clora-sample-mixed-") as tmp:
        root = Path(tmp)
        n_adapters = 5 if args.measure else 3  # 4 for the mixed batch, one more as an update's new weights
        adapters = [random_lora_adapter(model_dir, root / f"a{i}", rank=8, seed=i + 1, b_std=args.b_std)
                    for i in range(n_adapters)]
        print(f"model {model_dir} ({args.dtype}); starting vLLM (20-30 s)...")
        engine = await Engine.start(model_dir, model_cfg, engine_cfg, work_dir=root / "engine")
        try:
            async with ActorSystem("sample-mixed") as system:
                sampler = await system.start(
                    SamplerActor(model_dir, model_cfg, engine_cfg, shared_engine=engine),
                    name="sampler", supervision=Supervision.ESCALATE,
                )
                for tenant, path in zip(TENANTS, adapters):
                    await sampler.ask(RegisterAdapter(tenant=tenant, path=str(path), version=0))
                prompts = _chat_prompts(model_dir, len(QUESTIONS))
                await answer_mixed(sampler, prompts, [None, *TENANTS], args.max_tokens)
            if args.measure:
                ids = [engine.allocate_adapter_id() for _ in range(4)]
                slots = [(f"m{i}", lora_id, adapters[i]) for i, lora_id in enumerate(ids)]
                for slot in slots:
                    await engine.add_adapter(*slot)
                bench_prompts = _chat_prompts(model_dir, 32)
                await measure_throughput(engine, bench_prompts, slots)
                await measure_update(engine, bench_prompts, slots, adapters[4])
        finally:
            engine.shutdown()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a HF model directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random LoRA B matrices")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--measure", action="store_true", help="also measure throughput and update latency")
    return parser.parse_args()


if __name__ == "__main__":
    import structlog

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(parse_args()))
