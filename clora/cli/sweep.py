"""``clora sweep SWEEP.toml``: a base experiment x a grid (or list) of overrides x seeds, all tenants
at once on one warm runtime; then a ranked table, ``results.json`` and ``rewards.png`` in the run folder.

``--check`` validates the file (and, as the run does before it writes anything, the base model, envs
and LoRA targets: clora.preflight) and lists the tenants without starting anything. The run folder's
checkpoints are handled as by ``clora run`` (``--resume`` / ``--fresh``). docs/sweep.md has the format.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from clora.cli.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from clora.errors import ConfigError

__all__ = ["add_sweep_parser", "cmd_sweep", "load_sweep", "RESULTS_JSON", "REWARDS_PNG"]

RESULTS_JSON = "results.json"
REWARDS_PNG = "rewards.png"


def add_sweep_parser(sub: Any) -> None:
    """The ``sweep`` subcommand on the ``clora`` parser's subparsers."""
    sweep = sub.add_parser("sweep", help="run a grid of overrides x seeds of one experiment at once; rank them")
    sweep.add_argument("sweep", help="sweep TOML (see docs/sweep.md, examples/sweep.toml)")
    sweep.add_argument("--run-dir", help="override runtime.run_dir (default runs/<file name>)")
    sweep.add_argument("--check", action="store_true", help="only validate the file and list the tenants")
    start = sweep.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue each tenant from its checkpoint")
    start.add_argument("--fresh", action="store_true", help="start over even if the run folder holds checkpoints")
    sweep.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                       help="events at or above this level also print to stderr (all go to events.jsonl)")
    sweep.set_defaults(handler=cmd_sweep)


def load_sweep(path: str, run_dir: str | None = None) -> Any:
    """The expanded sweep of ``path``; every problem is one ConfigError that starts with the file name."""
    import msgspec

    from clora.sweep.spec import decode_sweep, expand

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep file {path!r} does not exist")
    try:
        sweep = expand(decode_sweep(file.read_bytes()), run_dir=f"runs/{file.stem}")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if run_dir is not None:
        sweep = msgspec.structs.replace(sweep, runtime=msgspec.structs.replace(sweep.runtime, run_dir=run_dir))
    return sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.run_dir)
    from rich.console import Console

    from clora.cli.run import check_before_start, checkpointed_tenants, run_experiments
    from clora.config import dump_toml
    from clora.observe.console import configure_console_logging
    from clora.sweep.report import tenants_table

    console = Console()
    config = sweep.runtime
    summary = (f"{len(sweep.tenants)} tenants ({len(sweep.points)} points x {len(sweep.seeds)} seeds) on "
               f"{config.model.source}, run folder {config.run_dir}")
    console.print(tenants_table(sweep, title=f"{args.sweep}: {summary}"))
    configure_console_logging(args.log_level)  # before the checks import the ML stack, which reads its settings
    check_before_start(args.sweep, config)
    if args.check:
        console.print(f"[green]ok[/]: {args.sweep} is valid: {summary} (base model, envs and LoRA targets "
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
    (run_dir / "sweep.toml").write_bytes(Path(args.sweep).read_bytes())
    (run_dir / "config.toml").write_bytes(dump_toml(config))
    console.print(f"[bold]clora sweep[/]: {summary}; events in {run_dir / 'events.jsonl'}")
    load_before, started = os.getloadavg(), time.time()
    try:
        results = run_experiments(config, console, args.log_level, resume=args.resume, done=done)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: the runtime stopped cleanly; events so far in {run_dir}")
        return EXIT_INTERRUPTED
    wall_s = time.time() - started
    return _report(args, sweep, results, console, wall_s=wall_s, loadavg=[load_before[0], os.getloadavg()[0]])


def _report(args: argparse.Namespace, sweep: Any, results: dict[str, Any], console: Any, **extra: Any) -> int:
    from clora.sweep.ranking import rank_points, tenant_outcome
    from clora.sweep.report import plot_rewards, ranked_table, results_document, write_results

    run_dir = Path(sweep.runtime.run_dir)
    outcomes = [tenant_outcome(t, results[t.name]) for t in sweep.tenants]
    rows = rank_points(sweep.points, outcomes)
    title = (f"sweep {args.sweep}: {len(sweep.points)} points x {len(sweep.seeds)} seeds, "
             f"{extra['wall_s']:.0f} s in all")
    console.print(ranked_table(rows, title))
    document = results_document(sweep, rows, outcomes, sweep_file=str(args.sweep), run_dir=str(run_dir), **extra)
    json_path = write_results(run_dir / RESULTS_JSON, document)
    png_path = plot_rewards(sweep, outcomes, run_dir / REWARDS_PNG, title=title)
    failed = [o for o in outcomes if not o.finished]
    for o in failed:
        console.print(f"[red]{o.name} failed[/]: {o.error}")
    console.print(f"results: {json_path}; reward curves: {png_path}; adapters: {run_dir / 'tenants'}/<tenant>/adapter")
    return EXIT_FAILED if failed else EXIT_OK
