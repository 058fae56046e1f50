"""``clora bench concurrency``: N RL experiments at once on one warm runtime vs one after another.

Modes, all in one run of the command, on the same experiment list (experiment i is the same
config in every mode; the tenants differ in seed and learning rate, as in a sweep):

* ``serial_cold``: each experiment starts its own Runtime (engine start, model load), trains,
  shuts down; the next follows. The single-tenant baseline every ratio is taken against.
* ``serial_warm``: the experiments one after another on one runtime (the cold-start saving alone).
* ``concurrent``: N experiments at once on one runtime, for each N in ``--n``; with ``--staleness
  0,1,2`` once per max_staleness k (rows ``concurrent`` for k = 0, ``concurrent_k1``, ...; each row's
  ``overlap`` is the fraction of wall time a tenant had a rollout and a train step in progress at once,
  docs/async.md).
* ``concurrent_priority`` (``--priority``): the same N at once, experiment 0 interactive and the
  others background (docs/scheduling.md); its first experiment time against serial_warm's first
  says what priority buys the interactive one, its final time against ``concurrent``'s what it
  costs the others. ``--max-loras`` / ``--max-resident`` cap the engine's LoRA slots and resident
  adapters (below N the sampler pages adapters: the ``scheduler.page_in`` events give the cost).
* ``peer`` (``--peer`` or ``--peer loop``): a single-tenant loop from HF transformers + peft
  (clora.bench.peer); ``trl`` (``--peer trl``): Hugging Face TRL's GRPOTrainer, each experiment in
  its own process (clora.bench.trl_peer, clora.bench.peers).

``--turns multi,single`` runs every mode on the multi-turn tool task and on its single-turn variant
(``env.single_turn``: the same problems answered in one turn, the only one TRL can run); rows say
which (``turns``). ``--peer trl`` adds ``single``.

``--task`` picks every experiment's env: ``arith0`` (default: one + or - on numbers to 10),
``arith1`` (one of + - * / on numbers to 99) or ``story2`` (two-step stories, GSM8K-like).

``--modes`` runs a subset of the first three (e.g. ``--modes concurrent --n 8`` to measure one
change quickly); rows without a ``serial_cold`` row of the same N in the same run get no ratios.

Every time is seconds from the start of its mode, and each mode's clock includes its runtime
start(s). Serial rows for N are the first N experiments of one serial run of max(N).
With ``--reuse-runtime`` (the ``--quick`` default) the warm and concurrent modes share one
runtime: its measured start time is added to each of those modes' clocks instead of a real start.
Writes ``results.json``, ``results.md`` (markdown table) and ``concurrency.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, get_args

import msgspec
import structlog

from clora import events
from clora.bench.metrics import ModeRow, aggregate, serial_prefix_rows
from clora.bench.peers import PEERS, peer_comparison, run_peer
from clora.bench.report import markdown_table, plot, results_table, rows_with_ratios, write_json
from clora.bench.rss import PeakRss
from clora.config import (
    EngineConfig,
    SchedulerConfig,
    EnvConfig,
    ExampleStyle,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainerConfig,
)
from clora.sched import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, YIELD_MODES
from clora.tenant.actor import ExperimentResult, StepRecord

__all__ = ["BenchSettings", "MODES", "TASKS", "TURNS", "QUICK", "FULL", "experiments", "task_env", "runtime_config",
           "run_benchmark", "build_parser", "main", "prioritized"]

log = structlog.get_logger(__name__)

T = TypeVar("T", int, float)


LEARNING_RATES = (1e-3, 2e-3, 5e-4)
"""``--lr``'s default: experiment i's learning rate is the (i mod 3)-th, a small sweep."""

MODES = ("serial_cold", "serial_warm", "concurrent")
"""The clora modes ``--modes`` chooses from (ratios need serial_cold)."""

TASKS: dict[str, int] = {"arith0": 0, "arith1": 1, "story2": 2}
"""``--task``: the arithmetic env's difficulty (clora.envs.arithmetic) of every experiment."""

TURNS = ("multi", "single")
"""``--turns``: the multi-turn tool task, its single-turn variant (env.single_turn)."""

HELD_OUT_SIZE = 64  # one held-out problem is 1.6 points of accuracy


@dataclass(frozen=True)
class BenchSettings:
    model: str = "smollm2"
    ns: tuple[int, ...] = (1, 2, 4, 8)
    steps: int = 10
    prompts_per_step: int = 4
    group_size: int = 4
    max_tokens: int = 48
    held_out_size: int = HELD_OUT_SIZE
    task: str = "arith0"  # a key of TASKS
    examples: str = "each_op"  # EnvConfig.examples: the worked examples before each question
    rank: int = 8
    learning_rates: tuple[float, ...] = LEARNING_RATES  # experiment i: learning_rates[i % len]
    max_model_len: int = 1024
    kv_cache_gib: float = 2.0
    autocast_bf16: bool | str = False  # True, False or "auto" (clora.precision)
    dtype: str = "float32"  # the engine's weights: "float32", "bfloat16" or "auto"
    temperature: float = 0.7  # at 1.0 SmolLM2-135M almost never uses the tool format (no reward signal)
    checkpoint_every: int = 0  # the runtime's own cost is measured; checkpoints are an I/O choice
    fused_ns: tuple[int, ...] = ()  # extra "concurrent_fused" rows: N tenants with TrainerConfig.fuse_max = N
    fuse_max: int = 1
    reuse_runtime: bool = False
    peer: tuple[str, ...] = ()  # peers of clora.bench.peers.PEERS: "loop", "trl"
    peer_experiments: int | None = None  # None: 1 for the loop, max(ns) for TRL
    turns: tuple[str, ...] = ("multi",)  # of TURNS: the task variants every mode runs
    modes: tuple[str, ...] = MODES
    # How the engine and the trainer share the cores (None / 0: the runtime's defaults)
    block_size: int | None = None  # EngineConfig.block_size
    engine_cpus: str | None = None  # EngineConfig.omp_threads_bind
    trainer_cpus: str | None = None  # TrainerConfig.cpus
    trainer_threads: int | None = None  # TrainerConfig.num_threads
    trainer_nice: int = 0  # TrainerConfig.nice
    priority: bool = False  # extra "concurrent_priority" rows: experiment 0 interactive, the rest background
    max_loras: int | None = None  # caps EngineConfig.max_loras (default: N)
    max_resident: int | None = None  # SchedulerConfig.max_resident_adapters (default: the engine's CPU cache)
    staleness: tuple[int, ...] = (0,)  # ExperimentConfig.max_staleness of the concurrent rows, one row set per k
    # The scheduler's rule between classes (docs/scheduling.md); the runtime's defaults
    yield_to_higher: str = SchedulerConfig().yield_to_higher  # SchedulerConfig.yield_to_higher
    linger_s: float = SchedulerConfig().linger_s  # SchedulerConfig.linger_s
    aging_s: float = SchedulerConfig().aging_s  # SchedulerConfig.aging_s

    @property
    def samples_per_step(self) -> int:
        """Rollouts one experiment samples per step."""
        return self.prompts_per_step * self.group_size


QUICK = BenchSettings(model="tiny", ns=(1, 2), steps=2, prompts_per_step=2, group_size=2, max_tokens=16,
                      held_out_size=4, kv_cache_gib=1.0, reuse_runtime=True)
FULL = BenchSettings(prompts_per_step=2, group_size=4, max_tokens=32, dtype="auto", autocast_bf16="auto")


def task_env(task: str, held_out_size: int, examples: str = "each_op", single_turn: bool = False) -> EnvConfig:
    """The env of ``--task``: the arithmetic tool-use env at the task's difficulty, one held-out set
    (seed 7); ``single_turn``: its single-turn variant (the same problems)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return EnvConfig(kind="arithmetic", difficulty=TASKS[task], examples=examples, held_out_size=held_out_size, seed=7,
                     single_turn=single_turn)


def experiments(s: BenchSettings, count: int, staleness: int = 0, turns: str = "multi") -> list[ExperimentConfig]:
    """Experiment i: the same task and budget for every i; seed i and learning rate
    ``s.learning_rates[i % len]`` (a sweep by default, one rate for the no-regression check).
    ``turns="single"``: the single-turn variant, experiment names ``st_exp{i}``."""
    if turns not in TURNS:
        raise ValueError(f"unknown turns {turns!r}; use one of {', '.join(TURNS)}")
    return [
        ExperimentConfig(
            name=f"exp{i}" if turns == "multi" else f"st_exp{i}",
            lora=LoraConfig(rank=s.rank, alpha=2.0 * s.rank),
            optim=OptimConfig(lr=s.learning_rates[i % len(s.learning_rates)]),
            env=task_env(s.task, s.held_out_size, s.examples, single_turn=turns == "single"),
            steps=s.steps,
            prompts_per_step=s.prompts_per_step,
            group_size=s.group_size,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            checkpoint_every=s.checkpoint_every,
            seed=i,
            max_staleness=staleness,
        )
        for i in range(count)
    ]


def prioritized(exps: list[ExperimentConfig], n: int) -> list[ExperimentConfig]:
    """The first ``n`` experiments as concurrent_priority runs them: the first interactive, the rest background."""
    return [msgspec.structs.replace(e, name=f"p{n}{e.name}",
                                    priority=PRIORITY_INTERACTIVE if i == 0 else PRIORITY_BACKGROUND)
            for i, e in enumerate(exps[:n])]


def runtime_config(s: BenchSettings, max_loras: int) -> RuntimeConfig:
    max_loras = max(1, min(max_loras, s.max_loras or max_loras))
    return RuntimeConfig(
        model=ModelConfig(source=s.model, dtype=s.dtype, max_model_len=s.max_model_len),
        scheduler=SchedulerConfig(max_resident_adapters=s.max_resident, yield_to_higher=s.yield_to_higher,
                                  linger_s=s.linger_s, aging_s=s.aging_s),
        engine=EngineConfig(max_loras=max_loras, max_lora_rank=max(8, s.rank), kv_cache_gib=s.kv_cache_gib,
                            block_size=s.block_size, omp_threads_bind=s.engine_cpus),
        trainer=TrainerConfig(autocast_bf16=s.autocast_bf16, fuse_max=s.fuse_max, cpus=s.trainer_cpus,
                              num_threads=s.trainer_threads, nice=s.trainer_nice),
    )


class _Progress:
    def __init__(self, console: Any, mode: str) -> None:
        self.console, self.mode = console, mode

    def __call__(self, tenant: str, record: StepRecord) -> None:
        self.console.log(f"{self.mode} {tenant} step {record.step} reward {record.reward_mean:.2f} "
                         f"rollout {record.time_rollout_s:.1f}s train {record.time_train_s:.1f}s")


def _checked(outcomes: dict[str, ExperimentResult | BaseException], mode: str) -> list[ExperimentResult]:
    for name, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            raise RuntimeError(f"{mode}: experiment {name} failed: {type(outcome).__name__}: {outcome}") from outcome
    return list(outcomes.values())


async def _serial_cold(s: BenchSettings, exps: list[ExperimentConfig], out: Path, console: Any) -> list[ModeRow]:
    import clora

    starts: list[float] = []
    results: list[ExperimentResult] = []
    with PeakRss() as peak:
        t0 = time.time()
        for exp in exps:
            began = time.time()
            async with clora.Runtime(runtime_config(s, 1), run_dir=out / "runs" / f"serial_cold_{exp.name}",
                                     console_level="warning") as rt:
                starts.append(time.time() - began)
                results.append(await rt.run(exp, on_step=_Progress(console, "serial_cold")))
    return serial_prefix_rows("serial_cold", results, t0, s.ns, peak_rss_bytes=peak.bytes, runtime_starts_s=starts,
                              samples_per_step=s.samples_per_step)


async def _warm_modes(s: BenchSettings, exps: list[ExperimentConfig], out: Path, console: Any) -> list[ModeRow]:
    """serial_warm then concurrent for each N; one runtime per mode, or one for all with ``reuse_runtime``."""
    import clora

    rows: list[ModeRow] = []
    async with contextlib.AsyncExitStack() as stack:
        shared, shared_start = None, 0.0
        if s.reuse_runtime:
            began = time.time()
            shared = await stack.enter_async_context(clora.Runtime(
                runtime_config(s, max(s.ns)), run_dir=out / "runs" / "shared", console_level="warning"))
            shared_start = time.time() - began

        engine: dict[str, Any] = {}  # what the engine did in the last mode

        async def measured(rt: Any, run: Any) -> list[ExperimentResult]:
            before = await rt.engine_stats()
            results = await run(rt)
            after = await rt.engine_stats()
            engine.clear()
            if before is not None and after is not None:
                engine.update(after.minus(before).fields())
            return results

        async def mode(name: str, n: int, run: Any, settings: BenchSettings = s,
                       ) -> tuple[list[ExperimentResult], float, float, int]:
            with PeakRss() as peak:
                t0 = time.time()
                if shared is not None and settings is s:
                    results = await measured(shared, run)
                    return results, t0 - shared_start, shared_start, peak.bytes
                async with clora.Runtime(runtime_config(settings, n), run_dir=out / "runs" / f"{name}_{n}",
                                         console_level="warning") as rt:
                    start_s = time.time() - t0
                    results = await measured(rt, run)
            return results, t0, start_s, peak.bytes

        async def serial(rt: Any) -> list[ExperimentResult]:
            progress = _Progress(console, "serial_warm")
            return [await rt.run(msgspec.structs.replace(e, name=f"w{e.name}"), on_step=progress) for e in exps]

        if "serial_warm" in s.modes:
            results, t0, start_s, peak = await mode("serial_warm", max(s.ns), serial)
            rows += serial_prefix_rows("serial_warm", results, t0, s.ns, peak_rss_bytes=peak,
                                       runtime_starts_s=[start_s], samples_per_step=s.samples_per_step)
        for n, k in [(n, k) for k in s.staleness for n in s.ns] if "concurrent" in s.modes else ():
            name = "concurrent" if k == 0 else f"concurrent_k{k}"

            async def concurrent(rt: Any, n: int = n, k: int = k, name: str = name) -> list[ExperimentResult]:
                tag = f"c{n}" if k == 0 else f"c{n}k{k}"
                batch = [msgspec.structs.replace(e, name=f"{tag}{e.name}", max_staleness=k) for e in exps[:n]]
                return _checked(await rt.run_many(batch, on_step=_Progress(console, f"{name} N={n}")), name)

            results, t0, start_s, peak = await mode(name, n, concurrent)
            rows.append(aggregate(name, results, t0, peak_rss_bytes=peak, runtime_start_s=start_s,
                                  engine=engine, samples_per_step=s.samples_per_step, staleness=k))
            log.info(events.BENCH_MODE_DONE, mode=name, n=n, final_s=round(rows[-1].final_s, 1))
        for n in s.ns if s.priority else ():  # the same N tenants, experiment 0 first (docs/scheduling.md)
            async def priority(rt: Any, n: int = n) -> list[ExperimentResult]:
                outcomes = await rt.run_many(prioritized(exps, n), on_step=_Progress(console, f"priority N={n}"))
                return _checked(outcomes, "concurrent_priority")

            results, t0, start_s, peak = await mode("concurrent_priority", n, priority)
            rows.append(aggregate("concurrent_priority", results, t0, peak_rss_bytes=peak, runtime_start_s=start_s,
                                  engine=engine))
            log.info(events.BENCH_MODE_DONE, mode="concurrent_priority", n=n, final_s=round(rows[-1].final_s, 1))
        for n in s.fused_ns:  # the same N tenants, their train steps fused up to N at a time (its own runtime)
            async def fused(rt: Any, n: int = n) -> list[ExperimentResult]:
                batch = [msgspec.structs.replace(e, name=f"f{n}{e.name}") for e in exps[:n]]
                return _checked(await rt.run_many(batch, on_step=_Progress(console, f"fused N={n}")), "fused")

            results, t0, start_s, peak = await mode("concurrent_fused", n, fused, replace(s, fuse_max=n))
            rows.append(aggregate("concurrent_fused", results, t0, peak_rss_bytes=peak, runtime_start_s=start_s,
                                  engine=engine, samples_per_step=s.samples_per_step))
            log.info(events.BENCH_MODE_DONE, mode="concurrent_fused", n=n, final_s=round(rows[-1].final_s, 1))
    return rows


async def _peers(s: BenchSettings, exps: list[ExperimentConfig], turns: str, console: Any) -> list[ModeRow]:
    """Each ``--peer`` that runs ``turns`` (TRL: the single-turn task only), rows tagged with it."""
    if not s.peer:
        return []
    from clora.precision import trainer_autocast_bf16

    import torch

    cuda = torch.cuda.is_available()
    bf16 = trainer_autocast_bf16(s.autocast_bf16, "cuda" if cuda else "cpu", cuda and torch.cuda.is_bf16_supported())
    rows: list[ModeRow] = []
    for peer in s.peer:
        if peer == "trl" and turns != "single":
            continue
        count = min(s.peer_experiments or (max(s.ns) if peer == "trl" else 1), len(exps))
        rows += [replace(row, turns=turns) for row in await run_peer(
            peer, exps, ModelConfig(source=s.model, max_model_len=s.max_model_len), s.ns, count=count, bf16=bf16,
            samples_per_step=s.samples_per_step, on_step=_Progress(console, f"{peer} ({turns}-turn)"))]
    return rows


async def run_benchmark(s: BenchSettings, out: Path, console: Any) -> dict[str, Any]:
    """Every mode, then the JSON document, the markdown table and the plot in ``out``.

    ``results.json`` is rewritten after each mode (``"complete": false`` until the last), so an
    interrupted run keeps the modes it finished.
    """
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()
    rows: list[ModeRow] = []

    def save(complete: bool) -> dict[str, Any]:
        items = rows_with_ratios(rows)
        document = {
            "complete": complete,
            "settings": {**s.__dict__, "ns": list(s.ns)},
            "machine": {
                "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": list(load_before),
                "loadavg_after": list(os.getloadavg()), "total_s": time.time() - started,
            },
            "measured": ("seconds from the start of each mode; each mode's clock includes its runtime start(s); "
                         "serial rows for N are the first N experiments of one serial run; tokens/s = tokens "
                         "sampled (rollouts and evals) / final time; peak RSS = largest sum of RSS over this "
                         "process and its children during the mode"),
            "rows": items,
            "peer_comparison": peer_comparison(items),
        }
        write_json(out / "results.json", document)
        return document

    for turns in s.turns:  # the multi-turn task, then its single-turn variant (own run folders)
        exps = experiments(s, max(s.ns), turns=turns)
        where = out if turns == "multi" else out / "single_turn"
        if "serial_cold" in s.modes:
            rows += [replace(r, turns=turns) for r in await _serial_cold(s, exps, where, console)]
            save(complete=False)
        rows += [replace(r, turns=turns) for r in await _warm_modes(s, exps, where, console)]
        save(complete=False)
    for turns in s.turns:
        rows += await _peers(s, experiments(s, max(s.ns), turns=turns), turns, console)
        save(complete=False)
    document = save(complete=True)
    (out / "results.md").write_text(markdown_table(document["rows"]))
    plot(document["rows"], out / "concurrency.png", _title(s))
    return document


def _title(s: BenchSettings) -> str:
    rates = "/".join(f"{lr:g}" for lr in s.learning_rates)
    return (f"clora concurrency on {s.model} ({s.dtype}), task {s.task} ({'/'.join(s.turns)}-turn, {s.examples} "
            f"examples): {s.steps} steps x {s.prompts_per_step} prompts x {s.group_size} samples at "
            f"T={s.temperature:g}, lr {rates}, max_tokens {s.max_tokens}, held-out {s.held_out_size}, "
            f"trainer bf16 {s.autocast_bf16}, fuse_max {s.fuse_max}, {os.cpu_count()} CPUs{_cpu_note(s)}"
            f"{_scheduler_note(s)}")


def _scheduler_note(s: BenchSettings) -> str:
    """The rule between priority classes, where a row has classes (concurrent_priority)."""
    if not s.priority:
        return ""
    return f", yield_to_higher {s.yield_to_higher} (linger {s.linger_s:g} s, aging {s.aging_s:g} s)"


def _cpu_note(s: BenchSettings) -> str:
    """The engine / trainer settings of this run that differ from the runtime's defaults."""
    parts = [f"{name} {value}" for name, value in (
        ("block", s.block_size), ("engine cpus", s.engine_cpus), ("trainer cpus", s.trainer_cpus),
        ("trainer threads", s.trainer_threads), ("trainer nice", s.trainer_nice or None)) if value is not None]
    return ", " + ", ".join(parts) if parts else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clora bench concurrency", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size: tiny model, N=1,2, 2 steps (minutes)")
    p.add_argument("--model", help="'smollm2', 'tiny' or a HF model directory")
    p.add_argument("--task", choices=tuple(TASKS), help="every experiment's env: arith0 (default; + or - to 10), "
                                                        "arith1 (+ - * / to 99), story2 (two-step stories)")
    p.add_argument("--examples", choices=get_args(ExampleStyle),
                   help="worked examples before each question (default each_op; 'addition' is the pre-0.2 prompt)")
    p.add_argument("--n", help="comma-separated N list, e.g. 1,2,4,8")
    for name in ("steps", "prompts-per-step", "group-size", "max-tokens", "held-out-size", "fuse-max",
                 "peer-experiments"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="trainer bf16 autocast (full size: auto, on where the hardware computes bf16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), help="the engine's weights")
    p.add_argument("--temperature", type=float, help="rollout temperature")
    p.add_argument("--lr", help="comma-separated learning rates, experiment i takes the (i mod count)-th "
                                "(default 0.001,0.002,0.0005; one rate: the experiments differ only in seed)")
    p.add_argument("--checkpoint-every", type=int, help="tenant checkpoints every K steps (default 0: none)")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all; ratios need "
                                   "serial_cold)")
    p.add_argument("--staleness", help="comma-separated max_staleness list for the concurrent rows, e.g. 0,1,2 "
                   "(default 0: on-policy; docs/async.md)")
    p.add_argument("--fused-n", help="comma-separated N list for extra concurrent_fused rows (fuse_max = N)")
    p.add_argument("--reuse-runtime", action=argparse.BooleanOptionalAction, default=None,
                   help="warm and concurrent modes share one runtime (default with --quick)")
    p.add_argument("--priority", action="store_true", help="also run concurrent_priority rows: experiment 0 "
                   "interactive, the others background")
    p.add_argument("--yield-to-higher", choices=YIELD_MODES,
                   help="while the interactive experiment is active, background work waits: its engine requests "
                        "and train steps (device, the runtime default), its engine requests (engine), or only "
                        "orders waiters (never); docs/scheduling.md")
    p.add_argument("--linger-s", type=float, help="scheduler.linger_s (default 2)")
    p.add_argument("--aging-s", type=float, help="scheduler.aging_s: a held-back tenant goes after this long (default 30)")
    p.add_argument("--max-loras", type=int, help="cap the engine's LoRA slots (default: N); below N tenants share them")
    p.add_argument("--max-resident", type=int, help="adapters kept in the engine (default: its CPU cache); "
                   "fewer than N pages adapters in and out")
    p.add_argument("--peer", nargs="?", const="loop", metavar="loop,trl",
                   help="also run peers, one experiment after another: 'loop' (the default of a bare --peer: the "
                        "in-repo transformers + peft loop) and/or 'trl' (TRL's GRPOTrainer, single-turn task; "
                        "needs the trl extra)")
    p.add_argument("--turns", metavar="multi,single",
                   help="task variants every mode runs: multi (the tool task, default) and/or single (its "
                        "single-turn variant; added by --peer trl)")
    p.add_argument("--block-size", type=int, help="engine KV block size = prefix cache unit (default: vLLM's)")
    p.add_argument("--engine-cpus", help="cores for the engine's threads, e.g. 0 (default: all)")
    p.add_argument("--trainer-cpus", help="cores for the trainer's threads, e.g. 1 (default: all)")
    p.add_argument("--trainer-threads", type=int, help="torch threads of the trainer (default: torch's)")
    p.add_argument("--trainer-nice", type=int, help="added to the trainer threads' nice value, 0-19 (default 0)")
    p.add_argument("--out", default="runs/bench_concurrency", help="output folder (results.json, concurrency.png)")
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    s = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for field in ("model", "task", "examples", "steps", "prompts_per_step", "group_size", "max_tokens", "held_out_size", "fuse_max",
                  "peer_experiments", "reuse_runtime", "dtype", "temperature", "checkpoint_every", "block_size",
                  "engine_cpus", "trainer_cpus", "trainer_threads", "trainer_nice", "max_loras", "max_resident",
                  "yield_to_higher", "linger_s", "aging_s"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    if args.n:
        changes["ns"] = tuple(sorted(set(_numbers("--n", args.n, int, lambda n: n >= 1, "positive integers"))))
    if args.lr is not None:
        changes["learning_rates"] = _numbers("--lr", args.lr, float, lambda lr: lr > 0,
                                             "positive numbers, e.g. 0.001 or 0.001,0.002")
    if args.staleness:
        changes["staleness"] = tuple(sorted(set(_numbers("--staleness", args.staleness, int, lambda k: k >= 0,
                                                         "integers >= 0, e.g. 0,1,2"))))
    if args.fused_n:
        largest = max(changes.get("ns", s.ns))
        changes["fused_ns"] = tuple(sorted(set(_numbers("--fused-n", args.fused_n, int, lambda n: 1 <= n <= largest,
                                                        "positive integers up to the largest --n"))))
    if args.modes is not None:
        modes = tuple(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
        unknown = [m for m in modes if m not in MODES]
        if not modes or unknown:
            raise SystemExit(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")
        changes["modes"] = modes
    if args.bf16 is not None:
        changes["autocast_bf16"] = args.bf16
    turns = _choices("--turns", args.turns, TURNS) if args.turns is not None else s.turns
    if args.peer is not None:
        changes["peer"] = _choices("--peer", args.peer, PEERS)
        if "trl" in changes["peer"] and "single" not in turns:  # TRL runs only the single-turn task
            turns = (*turns, "single")
    changes["turns"] = tuple(t for t in TURNS if t in turns)
    if args.priority:
        changes["priority"] = True
    return replace(s, **changes)


def _numbers(option: str, value: str, cast: Callable[[str], T], ok: Callable[[T], bool], rule: str) -> tuple[T, ...]:
    """The comma-separated numbers of ``option``, in order; SystemExit naming ``rule`` if one is not a
    number ``cast`` reads or ``ok`` refuses, or none is given."""
    try:
        numbers = tuple(cast(x) for x in value.split(",") if x.strip())
    except ValueError:
        numbers = ()
    if not numbers or not all(ok(x) for x in numbers):
        raise SystemExit(f"{option}: give {rule}, got {value!r}")
    return numbers


def _choices(option: str, value: str, allowed: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not chosen or any(v not in allowed for v in chosen):
        raise SystemExit(f"{option}: choose from {', '.join(allowed)}, got {value!r}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    from rich.console import Console

    import actors

    console = Console()
    if not console.is_terminal:  # a log file or CI: wide enough for the whole table on one line per row
        console = Console(width=180)
    out = Path(args.out)
    console.print(f"[bold]clora bench concurrency[/]: {_title(settings)}; N = {list(settings.ns)}; "
                  f"output in {out}; load average {os.getloadavg()[0]:.2f}")
    document = actors.run(lambda: run_benchmark(settings, out, console))
    console.print(results_table(document["rows"], _title(settings)))
    for entry in document["peer_comparison"]:
        parts = [f"{m} {entry[f'{m}_final_s']:.1f} s ({entry[f'{m}_speedup_vs_peer']:.2f}x)"
                 for m in ("serial_cold", "serial_warm", "concurrent") if f"{m}_speedup_vs_peer" in entry]
        who = "peer loop (transformers + peft)" if entry["peer"] == "peer" else "TRL GRPOTrainer serial"
        console.print(f"{who} {entry['turns']}-turn N={entry['n']}: final {entry['peer_final_s']:.1f} s; "
                      "clora final (peer time / clora time): " + ", ".join(parts))
    console.print(f"results: {out / 'results.json'}, plot: {out / 'concurrency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
