"""The demo: 4 tenants with different learning rates learn arithmetic tool use at once on SmolLM2.

The task is the built-in one at difficulty 1: word problems that need one of + - * / on numbers up to
99, solved by a Calculator call and a Final Answer. The untrained model knows the format (the worked
examples show it) but mostly picks the wrong operation (a quarter of 64 held-out problems right); RL teaches
it which operation each story needs. Every tenant runs clora's default recipe (docs/learning.md: 4
problems x 6 samples per step at temperature 1.0, PPO, LoRA rank 8) for 4 steps instead of 6, at
learning rates around the recipe's 1e-3 (in a measured run 2e-3 and 2.5e-3 learned less in 4 steps).

All four adapters sample in the same vLLM batches on one warm SmolLM2-135M-Instruct, one trainer
updates each adapter in turn, and every new version is loaded into the running engine in place.
Prints each tenant's held-out accuracy before and after, on 64 held-out problems, with the 95%
interval of the final accuracy and the count per operation, writes curves.png and timeline.png into
the run folder, and shows the commands to look further. Events: <run_dir>/events.jsonl.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import actors
import clora
from clora.config import (
    EngineConfig, EnvConfig, ExperimentConfig, LossConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainerConfig,
)
from clora.observe.console import configure_console_logging

LEARNING_RATES = (7.5e-4, 1e-3, 1.25e-3, 1.5e-3)  # one tenant per learning rate
BLOCK_SIZE = 32  # KV block in tokens: the prefix cache reuses every whole 32 tokens a prompt shares
HELD_OUT_SIZE = 64  # one problem is 1.6 points; all of them are evaluated at once


def experiments(steps: int, held_out: int = HELD_OUT_SIZE) -> tuple[ExperimentConfig, ...]:
    return tuple(
        ExperimentConfig(
            name=f"lr{lr:g}",
            optim=OptimConfig(lr=lr),
            loss=LossConfig(kind="ppo"),
            env=EnvConfig(kind="arithmetic", difficulty=1, held_out_size=held_out, seed=7),
            steps=steps,
            seed=i,
        )
        for i, lr in enumerate(LEARNING_RATES)
    )


async def main(args: argparse.Namespace) -> None:
    console = Console()
    config = RuntimeConfig(
        model=ModelConfig(source=args.model, dtype="auto", max_model_len=1024),  # bf16 where the hardware has it
        engine=EngineConfig(block_size=BLOCK_SIZE),
        trainer=TrainerConfig(autocast_bf16="auto"),
        run_dir=args.run_dir,
        experiments=experiments(args.steps, args.held_out),
    )
    console.print(f"[bold]clora demo[/]: {len(config.experiments)} tenants on {args.model}; events in {args.run_dir}/events.jsonl")
    started = time.perf_counter()
    async with clora.Runtime(config, console_level="warning") as rt:
        console.print(f"runtime warm in {time.perf_counter() - started:.0f} s (engine + trainer on one base model)")
        columns = (TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            bars = {e.name: progress.add_task(f"{e.name} evaluating", total=e.steps) for e in config.experiments}

            def on_step(tenant: str, record) -> None:
                progress.update(
                    bars[tenant], advance=1,
                    description=f"{tenant} step {record.step} reward {record.reward_mean:.2f} v{record.adapter_version}",
                )

            results = await rt.run_many(config.experiments, on_step=on_step)
    table = Table(title=f"held-out accuracy ({time.perf_counter() - started:.0f} s in all)")
    for column in ("tenant", "lr", "before", "after (95% interval)", "after, per operation", "steps trained", "time s"):
        table.add_column(column)
    from clora.observe import load_run_events  # after the run: the pictures' modules load only now

    events = load_run_events(args.run_dir)
    per_operation = final_counts_by_kind(events)
    for exp in config.experiments:
        result = results[exp.name]
        if isinstance(result, BaseException):
            table.add_row(exp.name, f"{exp.optim.lr:g}", "-", "-", "-", "-", f"failed: {result}")
            continue
        trained = sum(1 for s in result.steps if s.trained)
        end = result.score_end
        low, high = end.interval
        table.add_row(
            exp.name, f"{exp.optim.lr:g}", f"{result.accuracy_start:.0%}",
            f"{end.accuracy:.0%} ({end.correct}/{end.total}, {low:.0%}-{high:.0%})",
            per_operation.get(exp.name, "-"), str(trained),
            f"{result.duration_s:.0f}",
        )
    console.print(table)
    show_next_steps(console, args.run_dir, events, config.experiments, results)


OPERATION_SIGNS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}


def final_counts_by_kind(events: list[dict]) -> dict[str, str]:
    """Each tenant's last held-out evaluation per operation, e.g. "+16/16 -15/15 *9/17 /12/16"."""
    from clora import events as names

    last = {e["tenant"]: e for e in events if e["event"] == names.TENANT_EVAL}
    return {
        tenant: " ".join(f"{OPERATION_SIGNS.get(kind, kind)}{correct}/{total}"
                          for kind, (correct, total) in e.get("by_kind", {}).items())
        for tenant, e in last.items()
    }


def show_next_steps(console: Console, run_dir: str, events: list[dict], experiments, results) -> None:
    """The run's pictures, written into the run folder, and the commands to look further."""
    from clora.observe import curves, timeline

    for draw, name, what in ((curves, "curves.png", "reward and held-out accuracy per step"),
                             (timeline, "timeline.png", "where the time went")):
        try:
            info = draw(events, f"{run_dir}/{name}")
            console.print(f"{what}: {info.path}")
        except ValueError as e:  # nothing to draw (every tenant failed before its first step)
            console.print(f"no {name}: {e}")
    finished = [e for e in experiments if not isinstance(results[e.name], BaseException)]
    if not finished:
        return
    best = max(finished, key=lambda e: (results[e.name].accuracy_end, -finished.index(e))).name
    console.print("\nnext:", style="bold")
    console.print(f"  clora events {run_dir}                          # each tenant's steps, reward, accuracy, time",
                  highlight=False, soft_wrap=True)
    console.print(f"  clora export {run_dir} {best} out/{best}        # the best tenant's adapter, PEFT format",
                  highlight=False, soft_wrap=True)
    console.print(f'  clora sample out/{best} "What is 12 times 7?"   # try it (--base: the model without it)',
                  highlight=False, soft_wrap=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a HF model directory")
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--held-out", type=int, default=HELD_OUT_SIZE, metavar="N",
                        help=f"held-out problems each tenant is evaluated on before and after (default {HELD_OUT_SIZE})")
    args = parser.parse_args()
    configure_console_logging("warning")  # the console is for the progress bars: vLLM errors only, no library bars
    try:
        actors.run(lambda: main(args))
    except KeyboardInterrupt:  # the runtime already stopped its actors and the engine on the way out
        Console().print(f"interrupted; events so far are in {args.run_dir}/events.jsonl")
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli()
