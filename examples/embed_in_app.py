"""clora inside an existing asyncio application.

The app has its own work (here: a heartbeat task and a small job queue) and embeds a clora
Runtime next to it. Training runs as ordinary tasks on the app's event loop; the app stays
responsive (the heartbeat keeps ticking while tenants sample and train) and shuts everything
down in order when it is done.

    python examples/embed_in_app.py --model tiny
"""

from __future__ import annotations

import argparse
import asyncio
import time

import clora
from clora.config import EngineConfig, EnvConfig, ExperimentConfig, ModelConfig, OptimConfig, RuntimeConfig


async def heartbeat(period_s: float, gaps: list[float]) -> None:
    """The app's own periodic work; records how late each tick was."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(period_s)
        now = time.perf_counter()
        gaps.append(now - last - period_s)
        last = now


async def app(args: argparse.Namespace) -> None:
    config = RuntimeConfig(
        model=ModelConfig(source=args.model, max_model_len=1024),
        engine=EngineConfig(max_loras=2, max_lora_rank=8),
        run_dir=args.run_dir,
    )
    experiments = [
        ExperimentConfig(
            name=f"job{i}", optim=OptimConfig(lr=lr), env=EnvConfig(difficulty=0, held_out_size=8),
            steps=args.steps, prompts_per_step=2, group_size=4, max_tokens=32, seed=i,
        )
        for i, lr in enumerate((5e-4, 1e-3))
    ]
    lateness: list[float] = []
    async with asyncio.TaskGroup() as tg:
        beat = tg.create_task(heartbeat(0.1, lateness))
        async with clora.Runtime(config, console_level="warning") as rt:
            jobs = [tg.create_task(rt.run(exp)) for exp in experiments]  # the app schedules them like any task
            for job in asyncio.as_completed(jobs):
                result = await job
                print(f"{result.tenant}: accuracy {result.accuracy_start:.0%} -> {result.accuracy_end:.0%} "
                      f"in {result.duration_s:.0f} s")
        beat.cancel()
    worst = max(lateness, default=0.0)
    print(f"app heartbeat stayed alive: {len(lateness)} ticks, worst lateness {worst * 1000:.0f} ms")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--run-dir", default="runs/embedded")
    asyncio.run(app(parser.parse_args()))


if __name__ == "__main__":
    cli()
