"""Pure benchmark math: aggregation of ExperimentResults and ratios, hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from clora.bench.metrics import accuracy_vs_serial, aggregate, ratios, reward_curve, safe_ratio, serial_prefix_rows
from clora.bench.report import rows_with_ratios, write_json
from clora.bench.concurrency import QUICK, experiments, runtime_config, settings_from_args, build_parser
from clora.tenant.actor import ExperimentResult, StepRecord


def _step(i: int, reward: float, rollout: float, train: float, sync: float, trained: bool = True) -> StepRecord:
    return StepRecord(step=i, adapter_version=i, reward_mean=reward, time_rollout_s=rollout, time_train_s=train,
                      time_sync_s=sync, trained=trained)


def _result(name: str, start: float, end: float, steps: list[StepRecord], tokens: int,
            acc: tuple[float, float] = (0.25, 0.5)) -> ExperimentResult:
    return ExperimentResult(tenant=name, steps=steps, accuracy_start=acc[0], accuracy_end=acc[1],
                            started_at=start, finished_at=end, tokens_sampled=tokens)


T0 = 1000.0
A = _result("a", 1010.0, 1030.0, [_step(1, 0.0, 4.0, 2.0, 0.5), _step(2, 0.5, 6.0, 0.0, 0.0, trained=False)], 100)
B = _result("b", 1030.0, 1070.0, [_step(1, 1.0, 8.0, 4.0, 1.5), _step(2, 1.0, 2.0, 3.0, 1.0)], 300, (0.0, 1.0))


def test_aggregate_times_are_from_the_mode_start():
    row = aggregate("serial_cold", [A, B], T0, peak_rss_bytes=3 * 2**30, runtime_start_s=12.0)
    assert (row.first_s, row.mean_s, row.final_s) == (30.0, 50.0, 70.0)
    # steps: 6.5, 6.0, 13.5, 6.0 -> 32 / 4
    assert row.step_s == pytest.approx(8.0)
    assert row.rollout_s == pytest.approx(5.0)
    # trained steps only: A1, B1, B2
    assert row.train_s == pytest.approx(3.0)
    assert row.sync_s == pytest.approx(1.0)
    assert row.tokens == 400 and row.tokens_per_s == pytest.approx(400 / 70)
    assert row.peak_rss_gb == pytest.approx(3.0)
    assert row.accuracy_start == [0.25, 0.0] and row.accuracy_end == [0.5, 1.0]
    assert row.reward_curve == [0.5, 0.75]
    assert row.n == 2 and row.runtime_start_s == 12.0


def test_rollout_time_per_sample_counts_the_samples_decoded_at_once():
    # mean rollout per step 5.0 s (see above); 8 samples per tenant step
    assert math.isnan(aggregate("serial_cold", [A, B], T0).rollout_sample_s)  # samples per step unknown
    assert aggregate("serial_cold", [A, B], T0, samples_per_step=8).rollout_sample_s == pytest.approx(5.0 / 8)
    # concurrent: both tenants sample together, so a step's rollout time serves 2 x 8 samples
    assert aggregate("concurrent", [A, B], T0, samples_per_step=8).rollout_sample_s == pytest.approx(5.0 / 16)
    assert aggregate("concurrent_fused", [A, B], T0, samples_per_step=8).rollout_sample_s == pytest.approx(5.0 / 16)


def test_accuracy_vs_serial_counts_experiments_at_or_above_the_serial_mean_minus_one_sd():
    def ends(*accuracies):
        return [_result(f"e{i}", 1000.0, 1001.0, [], 1, (0.2, a)) for i, a in enumerate(accuracies)]

    serial = aggregate("serial_cold", ends(0.5, 0.7, 0.6), T0)  # mean 0.6, sample sd 0.1
    row = aggregate("concurrent", ends(0.5, 0.49, 0.9), T0)
    check = accuracy_vs_serial(row, serial)
    assert check["serial_mean"] == pytest.approx(0.6) and check["serial_sd"] == pytest.approx(0.1)
    assert (check["within"], check["of"]) == (2, 3)  # 0.5 is on the edge, 0.49 below, 0.9 above (no regression)
    one = accuracy_vs_serial(row, aggregate("serial_cold", ends(0.5), T0))
    assert one["serial_sd"] == 0.0 and one["within"] == 2
    items = {i["mode"]: i for i in rows_with_ratios([row, serial])}
    assert items["concurrent"]["accuracy_vs_serial"]["within"] == 2
    assert items["serial_cold"]["accuracy_vs_serial"]["within"] == 3  # the serial runs against themselves
    warm = aggregate("serial_warm", ends(0.9, 0.9, 0.9), T0)
    items = {i["mode"]: i for i in rows_with_ratios([row, warm])}  # no serial cold row: serial warm is the reference
    assert items["concurrent"]["accuracy_vs_serial"]["within"] == 1 and items["concurrent"]["ratios"] == {}
    assert {i["mode"]: i for i in rows_with_ratios([row, warm, serial])}["concurrent"]["accuracy_vs_serial"]["within"] == 2
    other_n = aggregate("concurrent", ends(0.5), T0)
    assert {i["n"]: i["accuracy_vs_serial"] for i in rows_with_ratios([other_n, serial])}[1] == {}  # no serial at N=1


def test_aggregate_rejects_no_results():
    with pytest.raises(ValueError):
        aggregate("concurrent", [], T0)


def test_reward_curve_handles_different_lengths():
    short = _result("s", 0, 1, [_step(1, 0.2, 1, 1, 1)], 1)
    assert reward_curve([short, B]) == [pytest.approx(0.6), pytest.approx(1.0)]


def test_serial_prefix_rows_take_the_first_n_experiments():
    rows = serial_prefix_rows("serial_cold", [A, B], T0, [2, 1], runtime_starts_s=[5.0, 7.0])
    assert [r.n for r in rows] == [1, 2]
    assert rows[0].final_s == 30.0 and rows[0].runtime_start_s == 5.0
    assert rows[1].final_s == 70.0 and rows[1].runtime_start_s == 12.0
    warm = serial_prefix_rows("serial_warm", [A, B], T0, [1, 2], runtime_starts_s=[9.0])
    assert [r.runtime_start_s for r in warm] == [9.0, 9.0]
    with pytest.raises(ValueError):
        serial_prefix_rows("serial_cold", [A], T0, [2])


def test_ratios_against_the_baseline():
    base = aggregate("serial_cold", [A, B], T0)  # first 30, mean 50, final 70
    both = [_result("c", 1000, 1035, B.steps, 400), _result("d", 1000, 1035, B.steps, 400)]
    row = aggregate("concurrent", both, T0)  # all 35; step 11.75 vs 8
    r = ratios(row, base)
    assert r["first_speedup"] == pytest.approx(30 / 35)
    assert r["mean_speedup"] == pytest.approx(50 / 35)
    assert r["final_speedup"] == pytest.approx(2.0)
    assert r["step_time_ratio"] == pytest.approx(((13.5 + 6.0) / 2) / 8.0)
    assert r["throughput_ratio"] == pytest.approx((800 / 35) / (400 / 70))
    with pytest.raises(ValueError):
        ratios(aggregate("concurrent", [A], T0), base)


def test_safe_ratio_nan_on_zero():
    assert safe_ratio(3.0, 2.0) == 1.5
    assert math.isnan(safe_ratio(1.0, 0.0))


def test_rows_with_ratios_order_and_json(tmp_path):
    rows = [aggregate("concurrent", [A], T0), aggregate("serial_cold", [A], T0), aggregate("peer", [B], T0)]
    items = rows_with_ratios(rows)
    assert [i["mode"] for i in items] == ["serial_cold", "concurrent", "peer"]
    assert items[1]["ratios"]["final_speedup"] == pytest.approx(1.0)
    assert items[2]["ratios"]["final_speedup"] == pytest.approx(30 / 70)
    path = write_json(tmp_path / "r.json", {"rows": items, "bad": math.nan})
    loaded = json.loads(path.read_text())
    assert loaded["bad"] is None and loaded["rows"][0]["mode"] == "serial_cold"


def test_markdown_rows_show_the_engine_stats_where_measured():
    from clora.bench.report import markdown_table
    from clora.sampler.engine_stats import EngineStatsSnapshot

    engine = EngineStatsSnapshot(prompt_tokens=3000, prompt_tokens_computed=1200, prompt_tokens_cached=1800,
                                 decode_steps=4, decode_rows=90).fields()
    rows = [aggregate("serial_cold", [A], T0), aggregate("concurrent", [A], T0, engine=engine)]
    lines = markdown_table(rows_with_ratios(rows)).splitlines()
    assert "prompt tok computed / cached | decode batch" in lines[0]
    assert "| 1,200 / 1,800 | 22.5 |" in lines[3] and "| - | - |" in lines[2]


def test_settings_and_configs_from_arguments():
    args = build_parser().parse_args(["--quick", "--n", "2,1,2", "--steps", "3", "--peer"])
    s = settings_from_args(args)
    assert s.ns == (1, 2) and s.steps == 3 and s.peer and s.model == QUICK.model and s.reuse_runtime
    exps = experiments(s, 3)
    assert [e.name for e in exps] == ["exp0", "exp1", "exp2"]
    assert len({(e.steps, e.prompts_per_step, e.group_size, e.max_tokens, e.env) for e in exps}) == 1
    assert runtime_config(s, 4).engine.max_loras == 4
    assert {e.env.examples for e in exps} == {"each_op"}


def test_lr_gives_every_experiment_its_learning_rate():
    default = experiments(settings_from_args(build_parser().parse_args([])), 4)
    assert [e.optim.lr for e in default] == [1e-3, 2e-3, 5e-4, 1e-3]  # the sweep
    one = experiments(settings_from_args(build_parser().parse_args(["--lr", "0.001"])), 8)
    assert {e.optim.lr for e in one} == {1e-3} and [e.seed for e in one] == list(range(8))
    two = experiments(settings_from_args(build_parser().parse_args(["--lr", "1e-3, 3e-3"])), 3)
    assert [e.optim.lr for e in two] == [1e-3, 3e-3, 1e-3]
    for bad in ("", "fast", "0.001,-1"):
        with pytest.raises(SystemExit, match="--lr: give positive numbers"):
            settings_from_args(build_parser().parse_args(["--lr", bad]))


def test_number_lists_refuse_what_is_not_a_number_of_their_kind_with_one_error():
    for option, bad, rule in (("--n", "a,2", "positive integers"), ("--n", "0", "positive integers"),
                              ("--staleness", "-1", "integers >= 0"), ("--staleness", "1.5", "integers >= 0"),
                              ("--fused-n", "x", "positive integers up to the largest --n")):
        with pytest.raises(SystemExit, match=f"{option}: give {rule}.*got '{bad}'"):
            settings_from_args(build_parser().parse_args([option, bad]))
    s = settings_from_args(build_parser().parse_args(["--n", "4, 1,4", "--fused-n", "4,2,2", "--staleness", "1,0"]))
    assert (s.ns, s.fused_ns, s.staleness) == ((1, 4), (2, 4), (0, 1))  # sorted, each once


def test_every_bench_concurrency_command_in_the_docs_parses():
    """The commands docs/ and the README show (measured runs among them) are valid as written."""
    import re
    import shlex

    root = Path(__file__).resolve().parents[1]
    commands = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:3] == ["clora", "bench", "concurrency"] and "--help" not in words:
                    commands.append((page.name, words[3:]))
    assert len(commands) >= 7 and any(page == "learning.md" for page, _ in commands)
    for page, args in commands:
        settings_from_args(build_parser().parse_args(args))  # SystemExit names the bad option


def test_examples_choose_the_worked_examples_of_every_experiment():
    s = settings_from_args(build_parser().parse_args(["--task", "arith1", "--examples", "addition"]))
    assert {(e.env.examples, e.env.difficulty) for e in experiments(s, 3)} == {("addition", 1)}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--examples", "some"])


def test_fused_rows_engine_dtype_temperature_and_checkpoints_from_arguments():
    args = build_parser().parse_args(["--n", "1,2,4", "--fused-n", "4,2", "--dtype", "bfloat16",
                                      "--temperature", "0.5", "--checkpoint-every", "3"])
    s = settings_from_args(args)
    assert s.fused_ns == (2, 4) and s.fuse_max == 1  # only the concurrent_fused rows fuse
    assert runtime_config(s, 2).model.dtype == "bfloat16"
    exps = experiments(s, 2)
    assert {e.temperature for e in exps} == {0.5} and {e.checkpoint_every for e in exps} == {3}
    with pytest.raises(SystemExit, match="--fused-n"):
        settings_from_args(build_parser().parse_args(["--n", "1,2", "--fused-n", "8"]))


def test_engine_and_trainer_cpu_settings_from_arguments():
    args = build_parser().parse_args(["--block-size", "32", "--engine-cpus", "0", "--trainer-cpus", "1",
                                      "--trainer-threads", "1", "--trainer-nice", "10"])
    cfg = runtime_config(settings_from_args(args), 8)
    assert (cfg.engine.block_size, cfg.engine.omp_threads_bind) == (32, "0")
    assert (cfg.trainer.cpus, cfg.trainer.num_threads, cfg.trainer.nice) == ("1", 1, 10)
    assert runtime_config(settings_from_args(build_parser().parse_args(["--no-bf16"])), 8).trainer.autocast_bf16 is False
    assert runtime_config(settings_from_args(build_parser().parse_args(["--quick", "--bf16"])), 8).trainer.autocast_bf16
    default = runtime_config(settings_from_args(build_parser().parse_args([])), 8)
    assert default.trainer.autocast_bf16 == "auto" and default.model.dtype == "auto"  # the full size: bf16 where it pays
    assert (default.engine.block_size, default.trainer.cpus, default.trainer.nice) == (None, None, 0)


def test_modes_pick_which_rows_run():
    assert settings_from_args(build_parser().parse_args([])).modes == ("serial_cold", "serial_warm", "concurrent")
    s = settings_from_args(build_parser().parse_args(["--modes", "concurrent, serial_warm,concurrent"]))
    assert s.modes == ("concurrent", "serial_warm")
    for bad in ("concurent", "", "peer"):
        with pytest.raises(SystemExit, match="--modes: choose from serial_cold, serial_warm, concurrent"):
            settings_from_args(build_parser().parse_args(["--modes", bad]))


def test_task_sets_the_env_of_every_experiment_and_full_size_evaluates_64_problems():
    default = settings_from_args(build_parser().parse_args([]))
    assert default.task == "arith0" and default.held_out_size >= 64  # one problem is at most ~1.6 points
    assert {e.env.difficulty for e in experiments(default, 2)} == {0}
    for task, difficulty in (("arith1", 1), ("story2", 2)):
        s = settings_from_args(build_parser().parse_args(["--task", task, "--held-out-size", "80"]))
        exps = experiments(s, 3)
        assert {(e.env.kind, e.env.difficulty, e.env.held_out_size) for e in exps} == {("arithmetic", difficulty, 80)}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--task", "gsm9k"])


def test_priority_rows_and_engine_caps_from_arguments():
    from clora.bench.concurrency import _title, prioritized
    from clora.sched import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE

    s = settings_from_args(build_parser().parse_args(["--n", "1,4", "--priority", "--max-loras", "2",
                                                      "--max-resident", "3"]))
    assert s.priority and (s.max_loras, s.max_resident) == (2, 3)
    config = runtime_config(s, 4)
    assert config.engine.max_loras == 2 and config.scheduler.max_resident_adapters == 3
    assert runtime_config(s, 1).engine.max_loras == 1  # the cap never raises N
    batch = prioritized(experiments(s, 4), 3)
    assert [(e.name, e.priority) for e in batch] == [
        ("p3exp0", PRIORITY_INTERACTIVE), ("p3exp1", PRIORITY_BACKGROUND), ("p3exp2", PRIORITY_BACKGROUND)]
    assert not settings_from_args(build_parser().parse_args([])).priority
    # the rule between classes: the runtime's default unless asked, in the runtime and in the title
    assert (s.yield_to_higher, config.scheduler.yield_to_higher) == ("device", "device")
    assert "yield_to_higher device (linger 2 s, aging 30 s)" in _title(s)
    s = settings_from_args(build_parser().parse_args(["--priority", "--yield-to-higher", "never", "--linger-s", "0.5",
                                                      "--aging-s", "90"]))
    config = runtime_config(s, 2)
    assert (config.scheduler.yield_to_higher, config.scheduler.linger_s, config.scheduler.aging_s) == ("never", 0.5, 90)
    assert "yield_to_higher never (linger 0.5 s, aging 90 s)" in _title(s)


def test_staleness_rows_from_arguments_and_the_overlap_of_rollouts_and_training():
    from clora.bench.metrics import overlap_fraction
    from clora.bench.report import markdown_table

    s = settings_from_args(build_parser().parse_args(["--quick", "--staleness", "2,0,1"]))
    assert s.staleness == (0, 1, 2) and {e.max_staleness for e in experiments(s, 2, staleness=1)} == {1}
    with pytest.raises(SystemExit, match="--staleness"):
        settings_from_args(build_parser().parse_args(["--staleness", "-1"]))
    # 10 s of wall time: rollouts [0, 4] and [3, 7], train steps [2, 5] and [8, 9] -> overlap [2, 5] = 30%
    steps = [
        msgspec.structs.replace(_step(1, 0.0, 4.0, 3.0, 0.0), rollout_at=(T0, T0 + 4), train_at=(T0 + 2, T0 + 5)),
        msgspec.structs.replace(_step(2, 0.0, 4.0, 1.0, 0.0), rollout_at=(T0 + 3, T0 + 7), train_at=(T0 + 8, T0 + 9)),
    ]
    result = msgspec.structs.replace(A, steps=steps, started_at=T0, finished_at=T0 + 10)
    assert overlap_fraction(result) == pytest.approx(0.3)
    assert overlap_fraction(A) == 0.0  # no spans recorded: the synchronous loop's records before this field
    rows = [aggregate("concurrent_k1", [result], T0, staleness=1), aggregate("concurrent", [A], T0)]
    items = rows_with_ratios(rows)
    assert [i["mode"] for i in items] == ["concurrent", "concurrent_k1"] and items[1]["overlap"] == pytest.approx(0.3)
    assert "| overlap |" in markdown_table(items).splitlines()[0] and "| 30% |" in markdown_table(items)


def test_the_table_never_cuts_a_mode_name_at_the_benchmarks_log_width():
    import re

    from rich.console import Console

    from clora.bench.report import MODE_ORDER, results_table

    rows = [aggregate(mode, [A], T0, samples_per_step=4) for mode in MODE_ORDER]
    console = Console(width=180, record=True)  # the width `clora bench concurrency` prints at into a log
    console.print(results_table(rows_with_ratios(rows), "title"))
    printed = console.export_text()
    for mode in MODE_ORDER:
        assert re.search(rf"^\s*[│|]\s*{mode}\s*[│|]", printed, re.MULTILINE), (mode, printed)
