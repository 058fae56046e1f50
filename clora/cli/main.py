"""The ``clora`` command: run experiments from TOML, read a run's events, export and try adapters.

    clora run experiments.toml              # progress bar per tenant; Ctrl-C stops cleanly (exit 130)
    clora run experiments.toml --resume     # continue each tenant from its checkpoint after a crash
    clora sweep examples/sweep.toml         # a grid of overrides x seeds at once, ranked by held-out accuracy
    clora events runs/latest --timeline t.png --curves c.png
    clora export runs/latest lr0.001 out/adapter
    clora sample out/adapter "What is 2+3?"
    clora bench concurrency --quick
    clora serve runtime.toml                # Tinker + OpenAI HTTP APIs on 127.0.0.1:8765

Exit codes: 0 done, 1 a tenant or the runtime failed, 2 bad input (usage, config, missing
files), 130 interrupted. Heavy modules (torch, vLLM, the runtime) load inside the commands that
need them, so ``clora --help`` and ``clora events`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from clora.cli.run import cmd_run, load_runtime_class
from clora.cli.serve import add_serve_parser
from clora.cli.sweep import add_sweep_parser
from clora.errors import CloraError, ConfigError
from clora.cli.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clora.observe import console as _console  # noqa: F401  (imported in engine processes too: quiets vLLM's import)
from clora.observe.artifacts import ArtifactError
from clora.observe.tensorboard import TensorBoardUnavailable

__all__ = ["main", "build_parser", "BenchCommand", "BENCHES", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE",
           "EXIT_INTERRUPTED"]



class BenchCommand(NamedTuple):
    """A ``clora bench NAME`` subcommand: ``module`` defines ``main(argv: list[str]) -> int | None``."""

    module: str
    help: str


# Adding a benchmark: write a module with `main(argv) -> int | None` (its own argparse; None means 0)
# and add a line here. A listed module that does not exist yet answers "not yet available".
BENCHES: dict[str, BenchCommand] = {
    "concurrency": BenchCommand(
        "clora.bench.concurrency", "N experiments at once on one runtime vs one after another: throughput"
    ),
    "trainer": BenchCommand("clora.bench.trainer", "time split of one LoRA train step, fp32 vs bf16"),
    "fused": BenchCommand("clora.bench.fused", "fused vs swapped multi-tenant train steps, K = 1..8 tenants"),
    "gpu": BenchCommand("clora.bench.gpu", "random-weight Qwen3 shapes: fused vs swapped, pinned swaps, memory"),
    "sampler": BenchCommand("clora.bench.sampler", "rollout decoding: clora's grouped CPU LoRA ops vs vLLM's own"),
    "serve": BenchCommand("clora.bench.serve_load", "load check of clora serve: Tinker loops + OpenAI chats on loopback"),
    "cluster": BenchCommand("clora.bench.cluster", "Ray placement layer: remote vs local ask round trip, publish fan-out"),
}

_BAD_INPUT = (ConfigError, ArtifactError, TensorBoardUnavailable)

# ----------------------------------------------------------------------------- helpers


def _err(command: str, message: str) -> None:
    print(f"clora {command}: error: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- events, export


def cmd_events(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clora.observe import (
        curves,
        engine_line,
        engine_summary,
        load_run_events,
        summarize,
        summary_table,
        timeline,
        write_tensorboard,
    )

    events = load_run_events(args.run_dir, all_runs=args.all_runs)
    rows = summarize(events)
    console = Console()
    if args.json:
        import msgspec

        print(msgspec.json.encode(rows).decode())
    else:
        console.print(summary_table(rows, title=f"{args.run_dir}: {len(events)} events"))
        engine = engine_summary(events)
        if engine is not None:
            console.print(engine_line(engine))
    try:
        if args.timeline:
            info = timeline(events, args.timeline)
            console.print(f"timeline: {info.path} ({len(info.rows)} rows, {info.marks} spans)")
        if args.curves:
            info = curves(events, args.curves)
            console.print(f"curves: {info.path} ({len(info.rows)} tenants, {info.marks} points)")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.tensorboard:
        written = write_tensorboard(events, args.tensorboard)
        console.print(f"tensorboard: {sum(written.values())} scalars for {len(written)} tenants in {args.tensorboard}"
                      f" (tensorboard --logdir {args.tensorboard})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from clora.observe.artifacts import export_tenant_adapter

    info = export_tenant_adapter(args.run_dir, args.tenant, args.out_dir, force=args.force)
    version = f"version {info.version}, " if info.version is not None else ""
    print(f"exported {args.tenant!r}: {version}rank {info.rank}, alpha {info.alpha:g}, {info.tensors} LoRA tensors, "
          f"{len(info.target_modules)} target modules -> {info.path} (PEFT format: PeftModel.from_pretrained "
          f"or vLLM LoRARequest load it)")
    return EXIT_OK


# ----------------------------------------------------------------------------- sample


_SAMPLE_OPTIONS = {"sampling.n": "-n", "sampling.max_tokens": "--max-tokens", "sampling.temperature": "--temperature"}


def cmd_sample(args: argparse.Namespace) -> int:
    from clora.observe.artifacts import check_peft_dir

    if args.base:
        adapter, prompts = None, list(args.items)
    else:
        if len(args.items) < 2:
            raise ConfigError("give an adapter folder and at least one prompt (or --base and prompts)")
        adapter, prompts = check_peft_dir(args.items[0]), list(args.items[1:])
    if not prompts:
        raise ConfigError("give at least one prompt")
    from clora.messages import SamplingSpec

    try:  # checked before any engine starts; the error names the option
        SamplingSpec(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature)
    except ConfigError as e:
        option = _SAMPLE_OPTIONS.get(getattr(e, "field", ""))
        raise ConfigError(f"{option}: {e.problem}" if option else str(e)) from None
    if args.max_tokens >= args.max_model_len:
        raise ConfigError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in --max-model-len "
                          f"{args.max_model_len}")
    model = args.model
    if model is None:  # the base the adapter was trained on, when that folder is still here
        base = adapter.base_model if adapter is not None else None
        model = base if base and Path(base).is_dir() else "smollm2"
    from clora.observe.console import configure_console_logging

    configure_console_logging()
    try:
        outputs = _sample(args, adapter, prompts, model)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    from rich.console import Console
    from rich.panel import Panel

    console = Console()
    console.print(f"{'adapter ' + str(adapter.path) if adapter is not None else 'the base model'} on {model}:")
    # The runtime serves the loaded file as its own version 1; what the user wants is the file's version.
    label = "base model" if adapter is None else (
        f"adapter version {adapter.version}" if adapter.version is not None else "adapter")
    for prompt, result in zip(prompts, outputs):
        body = "\n---\n".join(c.text for c in result.completions)
        console.print(Panel(body, title=prompt if len(prompt) <= 60 else prompt[:57] + "...", subtitle=label))
    return EXIT_OK


def _sample(args: argparse.Namespace, adapter: Any, prompts: list[str], model: str) -> list[Any]:
    import asyncio
    import tempfile

    import actors
    from clora.config import EngineConfig, LoraConfig, ModelConfig, RuntimeConfig

    rank = adapter.rank if adapter is not None else 8
    config = RuntimeConfig(
        model=ModelConfig(source=model, max_model_len=args.max_model_len),
        engine=EngineConfig(max_loras=1, max_lora_rank=max(rank, 8), kv_cache_gib=1.0),
    )
    messages = [[*([{"role": "system", "content": args.system}] if args.system else []),
                 {"role": "user", "content": p}] for p in prompts]
    runtime_class = load_runtime_class()

    async def sample_all() -> list[Any]:
        from clora.messages import SampleRequest, SamplingSpec

        with tempfile.TemporaryDirectory(prefix="clora-sample-") as run_dir:
            async with runtime_class(config, run_dir=run_dir, console_level="warning") as rt:
                if adapter is None:
                    spec = SamplingSpec(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature)
                    asks = [rt.sampler.ask(SampleRequest(tenant=None, prompt_token_ids=rt.renderer.initial(m),
                                                         sampling=spec)) for m in messages]
                else:
                    lora = LoraConfig(rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules)
                    handle = await rt.tenant("sample", lora=lora)
                    await handle.load(adapter.path)
                    asks = [handle.sample(m, n=args.n, max_tokens=args.max_tokens, temperature=args.temperature)
                            for m in messages]
                return list(await asyncio.gather(*asks))

    return actors.run(sample_all)


# ----------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    available = ", ".join(sorted(BENCHES))
    if args.name is None:
        raise ConfigError(f"name a benchmark: {available}")
    bench = BENCHES.get(args.name)
    if bench is None:
        raise ConfigError(f"unknown benchmark {args.name!r}; known: {available}")
    try:
        module = importlib.import_module(bench.module)
    except ModuleNotFoundError as e:
        if e.name is None or not bench.module.startswith(e.name):
            raise  # the benchmark exists but one of its imports does not
        raise ConfigError(f"'clora bench {args.name}' is not yet available ({bench.module} is not written yet)") \
            from None
    program, sys.argv[0] = sys.argv[0], f"clora bench {args.name}"  # the benchmark's argparse names itself so
    try:
        code = module.main(list(args.args))
    except SystemExit as e:  # the benchmark's own argparse (--help, a usage error) or its check of a value
        code = e.code
        if isinstance(code, str):  # a message (SystemExit("--lr: ...")): say it, as for any bad input
            _err(f"bench {args.name}", code)
            code = EXIT_USAGE
    finally:
        sys.argv[0] = program
    return EXIT_OK if code is None else code if isinstance(code, int) else EXIT_FAILED


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clora", description="Train many LoRA adapters by RL on one warm base model, concurrently.",
        epilog="Exit codes: 0 done, 1 failed, 2 bad input, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the experiments of a TOML file on one runtime")
    run.add_argument("config", help="experiments TOML (see docs/configuration.md, examples/experiments.toml)")
    run.add_argument("--run-dir", help="override run_dir of the file (events.jsonl, tenants/<name>/adapter)")
    run.add_argument("--cluster", metavar="ADDRESS",
                     help="run the sampler(s) and trainer on a Ray cluster: 'auto', 'local' or host:port "
                          "(sets [cluster] address; the file's other [cluster] settings stay; docs/scale-out.md)")
    run.add_argument("--check", action="store_true", help="only validate the file")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue each experiment from its checkpoint in the run folder (after a crash or Ctrl-C)")
    start.add_argument("--fresh", action="store_true",
                       help="start over even if the run folder holds checkpoints (they are deleted)")
    run.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                     help="events at or above this level also print to stderr (all go to events.jsonl)")
    run.set_defaults(handler=cmd_run)

    add_sweep_parser(sub)
    add_serve_parser(sub)

    events = sub.add_parser("events", help="summarize a run folder's events; draw its timeline and curves")
    events.add_argument("run_dir", help="run folder (or an events.jsonl file)")
    events.add_argument("--timeline", metavar="PNG", help="Gantt chart: what each tenant and actor did when")
    events.add_argument("--curves", metavar="PNG", help="reward/mean and held-out accuracy per tenant vs step")
    events.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars (needs tensorboard)")
    events.add_argument("--all-runs", action="store_true",
                        help="every run appended to the file, not only the last (a --resume continues its run)")
    events.add_argument("--json", action="store_true", help="print the summary rows as JSON")
    events.set_defaults(handler=cmd_events)

    export = sub.add_parser("export", help="copy a tenant's final adapter (PEFT format) out of a run folder")
    export.add_argument("run_dir")
    export.add_argument("tenant")
    export.add_argument("out_dir")
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    export.set_defaults(handler=cmd_export)

    sample = sub.add_parser("sample", help="try an adapter (or the base model) on prompts",
                            usage="clora sample [options] (ADAPTER_DIR | --base) PROMPT [PROMPT ...]")
    sample.add_argument("items", nargs="+", metavar="ADAPTER_DIR|PROMPT", help="adapter folder, then prompts")
    sample.add_argument("--base", action="store_true", help="sample the base model; every argument is a prompt")
    sample.add_argument("--model", help="'smollm2', 'tiny' or a HF folder (default: the adapter's base, else smollm2)")
    sample.add_argument("--system", help="a system message before each prompt")
    sample.add_argument("-n", type=int, default=1, help="completions per prompt")
    sample.add_argument("--max-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sample.add_argument("--max-model-len", type=int, default=1024)
    sample.set_defaults(handler=cmd_sample)

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(f"{k} ({v.help})" for k, v in BENCHES.items()))
    bench.add_argument("name", nargs="?", help=" | ".join(BENCHES))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clora`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _BAD_INPUT as e:  # a config, a missing file or adapter folder, a missing optional package
        _err(args.command, str(e))
        return EXIT_USAGE
    except CloraError as e:
        _err(args.command, f"{type(e).__name__}: {e}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
