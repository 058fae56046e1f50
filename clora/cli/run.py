"""``clora run``: experiments from a TOML file on one runtime, with a progress bar per tenant.

Refuses (exit 2) a run folder that holds checkpoints unless ``--resume`` or ``--fresh`` says what
to do with them; Ctrl-C stops the runtime through its context manager and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from clora.errors import ConfigError
from clora.cli.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

__all__ = ["check_before_start", "checkpointed_tenants", "cmd_run", "load_run_config", "print_run_summary", "run_experiments",
           "load_runtime_class"]


def load_runtime_class() -> Any:
    from clora.runtime import (
        Runtime,  # torch + vLLM: only when a command needs the runtime
    )

    return Runtime


def load_run_config(args: argparse.Namespace) -> Any:
    import msgspec

    from clora.config import load_toml

    try:
        config = load_toml(args.config)
    except ConfigError as e:
        if args.config in str(e):
            raise
        raise ConfigError(f"{args.config}: {e}") from None
    if args.run_dir is not None:
        config = msgspec.structs.replace(config, run_dir=args.run_dir)
    if getattr(args, "cluster", None) is not None:  # the same file, on a Ray cluster
        from clora.config import ClusterConfig

        cluster = msgspec.structs.replace(config.cluster or ClusterConfig(), address=args.cluster)
        config = msgspec.structs.replace(config, cluster=cluster)
    if not config.experiments:
        raise ConfigError(f"{args.config}: no experiments; add at least one [[experiments]] table with a name")
    return config


def cmd_run(args: argparse.Namespace) -> int:
    config = load_run_config(args)
    from rich.console import Console

    from clora.config import dump_toml
    from clora.observe.console import configure_console_logging

    console = Console()
    names = ", ".join(e.name for e in config.experiments)
    configure_console_logging(args.log_level)  # before the checks import the ML stack, which reads its settings
    check_before_start(args.config, config)
    if args.check:
        console.print(f"[green]ok[/]: {args.config} is valid: {len(config.experiments)} experiments ({names}) "
                      f"on {config.model.source}, run folder {config.run_dir} (base model, envs and LoRA targets "
                      "checked; nothing started)")
        return EXIT_OK
    run_dir = Path(config.run_dir)
    from clora.checkpoint.format import checkpoint_steps

    done = checkpoint_steps(run_dir, [e.name for e in config.experiments]) if args.resume else {}
    checkpointed = checkpointed_tenants(run_dir, config)
    if checkpointed and not (args.resume or args.fresh):
        raise ConfigError(
            f"run folder {run_dir} holds checkpoints of {', '.join(checkpointed)}: pass --resume to continue "
            "them, or --fresh to start over (their checkpoints are deleted), or use another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_bytes(dump_toml(config))
    console.print(f"[bold]clora run[/]: {len(config.experiments)} experiments ({names}) on {config.model.source}; "
                  f"events in {run_dir / 'events.jsonl'}")
    if args.resume:
        console.print(f"resuming: {', '.join(checkpointed) or 'no checkpoints yet, every tenant starts fresh'}")
    try:
        results = run_experiments(config, console, args.log_level, resume=args.resume, done=done)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: the runtime stopped cleanly; events so far in {run_dir}")
        return EXIT_INTERRUPTED
    shown = print_run_summary(console, run_dir)
    failed = {name: r for name, r in results.items() if isinstance(r, BaseException)}
    for name, error in failed.items():
        if name not in shown:  # the summary names each failed tenant's error already: once is enough
            console.print(f"[red]{name} failed[/]: {type(error).__name__}: {error}")
    console.print(f"adapters: {run_dir / 'tenants'}/<tenant>/adapter; picture: clora events {run_dir} "
                  f"--timeline {run_dir / 'timeline.png'} --curves {run_dir / 'curves.png'}")
    return EXIT_FAILED if failed else EXIT_OK


def check_before_start(file: str, config: Any) -> None:
    """What can fail before the engine starts fails here, naming ``file`` (the experiments or sweep file
    ``config`` came from; clora.preflight)."""
    from clora.preflight import check_run

    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{file}: run_dir {str(run_dir)!r} exists and is not a folder")
    try:
        check_run(config)
    except ConfigError as e:
        raise type(e)(f"{file}: {e}") from None


def checkpointed_tenants(run_dir: Path, config: Any) -> list[str]:
    """"name (step N/M)" of each experiment with a committed checkpoint in ``run_dir``."""
    from clora.checkpoint.format import checkpoint_steps

    steps = checkpoint_steps(run_dir, [e.name for e in config.experiments])
    total = {e.name: e.steps for e in config.experiments}
    return [f"{name} (step {'?' if step is None else step}/{total[name]})" for name, step in steps.items()]


def run_experiments(
    config: Any, console: Any, log_level: str, *, resume: bool = False, done: dict[str, int | None] | None = None
) -> dict[str, Any]:
    """All experiments on one runtime with a progress bar each (``done``: steps already completed).

    Ctrl-C cancels the main task, so the runtime leaves through its context manager (actors
    aborted, engine shut down) and KeyboardInterrupt comes out of here. A terminal's Ctrl-C also
    reaches vLLM's engine process, which may die first: then the runtime's exit raises that crash
    instead of the cancellation. Whatever comes out after a Ctrl-C is reported as the interruption.
    """
    import signal

    import actors
    from clora.observe.console import ProgressBars

    runtime_class = load_runtime_class()
    interrupted = []

    async def run_all() -> dict[str, Any]:
        previous = signal.getsignal(signal.SIGINT)  # asyncio.Runner's: it cancels this task

        def on_sigint(signum: int, frame: Any) -> None:
            interrupted.append(signum)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
        try:
            async with contextlib.AsyncExitStack() as stack:
                with console.status("starting the runtime (engine and trainer on one base model)..."):
                    options = {"resume": True} if resume else {}
                    runtime = await stack.enter_async_context(
                        runtime_class(config, console_level=log_level, **options)
                    )
                with ProgressBars(console, config.experiments, done=done) as progress:
                    return await runtime.run_many(config.experiments, on_step=progress.on_step)
        finally:
            signal.signal(signal.SIGINT, previous)

    try:
        return actors.run(run_all)
    except BaseException as e:
        if not interrupted or isinstance(e, SystemExit):
            raise
        if not isinstance(e, KeyboardInterrupt):
            console.print(f"[dim]while stopping: {type(e).__name__}: {e}[/]")
        raise KeyboardInterrupt from e


def print_run_summary(console: Any, run_dir: Path) -> set[str]:
    """The run's summary tables; returns the tenants it shows as failed (with their error)."""
    from clora.observe import load_run_events, summarize, summary_table

    try:
        events = load_run_events(str(run_dir), all_runs=False)
    except ConfigError as e:
        console.print(f"[yellow]no summary[/]: {e}")
        return set()
    rows = summarize(events)
    console.print(summary_table(rows, title=f"run {run_dir}"))
    return {r.tenant for r in rows if r.status == "failed"}
