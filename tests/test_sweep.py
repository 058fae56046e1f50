"""Sweeps without an engine: expansion and naming, one clear error per bad file, the ranking math by
hand, and ``clora sweep`` on a fake runtime (its table, results.json and picture)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from clora.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from clora.errors import ConfigError
from clora.rl.accuracy import wilson_interval
from clora.sweep import decode_sweep, expand
from clora.sweep.ranking import TenantOutcome, rank_points
from clora.tenant.actor import ExperimentResult, StepRecord

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
seeds = 2
[runtime]
model = { source = "tiny" }
[base]
steps = 3
max_tokens = 16
env = { difficulty = 1, held_out_size = 64, seed = 7 }
[grid]
"optim.lr" = [1e-3, 3e-4]
loss.kind = ["ppo", "cispo"]
"""


def _sweep(text: str, **kwargs):
    return expand(decode_sweep(text), **kwargs)


# ----------------------------------------------------------------------------- expansion and naming


def test_a_grid_is_the_cartesian_product_times_the_seeds_in_file_order():
    sweep = _sweep(SWEEP)
    assert [p.overrides for p in sweep.points] == [
        {"optim.lr": 1e-3, "loss.kind": "ppo"}, {"optim.lr": 1e-3, "loss.kind": "cispo"},
        {"optim.lr": 3e-4, "loss.kind": "ppo"}, {"optim.lr": 3e-4, "loss.kind": "cispo"},
    ]
    assert [t.name for t in sweep.tenants] == [
        "lr-0.001_kind-ppo_s0", "lr-0.001_kind-ppo_s1", "lr-0.001_kind-cispo_s0", "lr-0.001_kind-cispo_s1",
        "lr-0.0003_kind-ppo_s0", "lr-0.0003_kind-ppo_s1", "lr-0.0003_kind-cispo_s0", "lr-0.0003_kind-cispo_s1",
    ]
    last = sweep.tenants[-1].experiment
    assert (last.optim.lr, last.loss.kind, last.seed, last.steps, last.max_tokens) == (3e-4, "cispo", 1, 3, 16)
    assert (last.env.difficulty, last.env.held_out_size, last.env.seed) == (1, 64, 7)  # one held-out set for all
    assert last.optim.beta1 == 0.9  # fields nobody set keep their defaults
    assert sweep.runtime.experiments == tuple(t.experiment for t in sweep.tenants)
    assert sweep.runtime.model.source == "tiny" and sweep.runtime.run_dir == "runs/sweep"
    assert [t.point for t in sweep.tenants_of(2)] == [2, 2] and sweep.seeds == [0, 1]


def test_points_cross_the_grid_merge_tables_into_the_base_and_may_name_themselves():
    sweep = _sweep("""
seeds = [3, 11]
[runtime]
run_dir = "runs/mine"
[base]
env = { difficulty = 1, held_out_size = 64 }
[grid]
"lora.rank" = [4, 8]
[[points]]
name = "easy"
env = { difficulty = 0 }
[[points]]
loss = { kind = "cispo", clip_high = 4.0 }
""")
    assert [t.name for t in sweep.tenants] == [
        "easy_rank-4_s3", "easy_rank-4_s11", "easy_rank-8_s3", "easy_rank-8_s11",
        "kind-cispo_clip_high-4_rank-4_s3", "kind-cispo_clip_high-4_rank-4_s11",
        "kind-cispo_clip_high-4_rank-8_s3", "kind-cispo_clip_high-4_rank-8_s11",
    ]
    easy = sweep.tenants[0].experiment
    assert (easy.env.difficulty, easy.env.held_out_size, easy.lora.rank, easy.seed) == (0, 64, 4, 3)
    cispo = sweep.tenants[-1].experiment
    assert (cispo.loss.kind, cispo.loss.clip_high, cispo.env.difficulty, cispo.lora.rank) == ("cispo", 4.0, 1, 8)
    assert sweep.points[0].origins == {"env.difficulty": "points[0].env.difficulty", "lora.rank": "grid.lora.rank"}
    assert sweep.runtime.run_dir == "runs/mine"


def test_names_use_whole_paths_when_last_parts_clash_and_fall_back_to_the_point_index():
    sweep = _sweep("""
[grid]
"loss.kind" = ["ppo"]
"env.kind" = ["arithmetic"]
"env.examples" = ["each_op", "addition"]
""")
    assert [t.name for t in sweep.tenants] == [
        "loss.kind-ppo_env.kind-arithmetic_examples-each_op_s0",
        "loss.kind-ppo_env.kind-arithmetic_examples-addition_s0",
    ]
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    long = _sweep(f'[grid]\n"lora.target_modules" = [{modules}, ["q_proj"]]'.replace("'", '"'))
    assert [t.name for t in long.tenants] == ["p0_s0", "target_modules-q_proj_s0"]  # the first is over 64 characters
    assert long.tenants[0].experiment.lora.target_modules == tuple(modules)
    base_only = _sweep("seeds = 2\n[base]\nsteps = 2")
    assert [t.name for t in base_only.tenants] == ["base_s0", "base_s1"]


def test_many_tenants_keep_every_adapter_in_the_engine_cpu_cache():
    twenty = _sweep('seeds = 5\n[grid]\n"optim.lr" = [1e-4, 2e-4, 3e-4, 4e-4]')
    assert len(twenty.tenants) == 20 and twenty.runtime.engine.max_cpu_loras == 20
    assert _sweep(SWEEP).runtime.engine.max_cpu_loras is None  # 8 tenants: the engine's default covers them
    pinned = _sweep('seeds = 5\n[runtime]\nengine = { max_cpu_loras = 9 }\n'
                    '[grid]\n"optim.lr" = [1e-4, 2e-4, 3e-4, 4e-4]')
    assert pinned.runtime.engine.max_cpu_loras == 9  # the file's own choice stays


# ----------------------------------------------------------------------------- one clear error per bad file


@pytest.mark.parametrize(("text", "message"), [
    ('[grid]\n"optim.lrr" = [1e-3]', r"^grid\.optim\.lrr: unknown field; valid fields here: lr, beta1, beta2"),
    ('[grid]\n"lrr" = [1e-3]', r"^grid\.lrr: unknown field; valid fields here: lora, optim, loss, env, steps"),
    ('[grid]\n"steps.x" = [1]', r"^grid\.steps\.x: unknown field; steps is a value, not a table"),
    ('[grid]\n"optim.lr" = []', r"^grid\.optim\.lr: empty list; give at least one value"),
    ('[grid]\n"optim.lr" = 1e-3', r"^grid\.optim\.lr: expected a list of values, got float"),
    ('[grid]\n"optim.lr" = [1e-3, 1e-3]', r"^grid\.optim\.lr: value 0\.001 appears twice"),
    ('[grid]\n"optim.lr" = ["fast"]',
     r"^grid\.optim\.lr: expected float, got str \(value 'fast', tenant 'lr-fast_s0'\)"),
    ('[grid]\n"optim.lr" = [-1.0]', r"^grid\.optim\.lr: must be > 0, got -1\.0"),
    ('[grid]\n"loss.kind" = ["ppo", "grpo"]', r"^grid\.loss\.kind: invalid value 'grpo'; use one of"),
    ('[grid]\n"lora.rank" = [8, 32]',
     r"^grid\.lora\.rank: 32 exceeds engine\.max_lora_rank 16 \(value 32, tenant 'rank-32_s0'\)$"),
    ('[grid]\nseed = [1, 2]', r"^grid\.seed: the experiment seed is the sweep's seed axis: set `seeds = N`"),
    ('[grid]\nname = ["a"]', r"^grid\.name: a sweep names its tenants from their overrides"),
    ('[base]\nname = "x"', r"^base\.name: a sweep names its tenants"),
    ('[base]\nsteps = 0', r"^base\.steps: must be >= 1, got 0 \(tenant 'base_s0'\)"),
    ('[base]\noptim = { lrr = 1.0 }', r"^base\.optim\.lrr: unknown field; valid fields here: lr,"),
    ('[base]\noptim = 5\n[grid]\n"optim.lr" = [1e-3]', r"^base\.optim: expected a table, got int"),
    ('[runtime]\nengine = { max_loras = 0 }', r"^runtime\.engine\.max_loras: must be >= 1, got 0"),
    ('[runtime]\nmodle = { source = "tiny" }', r"^runtime\.modle: unknown field; valid fields here: model, engine"),
    ('[[runtime.experiments]]\nname = "a"', r"^runtime\.experiments: a sweep makes its experiments from \[base\]"),
    ('seeds = 0', r"^seeds: must be >= 1"),
    ('seeds = [1, 1]', r"^seeds: give distinct seeds >= 0"),
    ('seed = 3', r"^seed: unknown field; valid fields here: runtime, base, grid, points, seeds"),
    ('[grid]\n"optim.lr" = [1e-3]\n[[points]]\noptim = { lr = 2e-3 }',
     r"^points\[0\]\.optim\.lr: also a grid axis"),
    ('[[points]]\n"optim.lr" = 1e-3\n[[points]]\noptim = { lr = 1e-3 }',
     r"^points\[1\]\.optim\.lr: tenant name 'lr-0\.001_s0' also names point 0"),
    ('[[points]]\nname = "same"\n[[points]]\nname = "same"\nsteps = 2', r"^points\[1\]\.steps: tenant name 'same_s0'"),
    ('[[points]]\nname = 3', r"^points\[0\]\.name: expected str, got int"),
    ('[grid\n', r"^malformed TOML"),
])
def test_a_bad_sweep_file_is_one_error_naming_the_field(text, message):
    with pytest.raises(ConfigError, match=message):
        _sweep(text)


# ----------------------------------------------------------------------------- ranking by hand


def _outcome(name: str, point: int, seed: int, end: float, rewards: list[float], *, held_out: int = 16,
             duration: float = 10.0) -> TenantOutcome:
    return TenantOutcome(name=name, point=point, seed=seed, accuracy_start=0.25, accuracy_end=end,
                         correct_end=round(end * held_out), held_out=held_out, reward_curve=rewards,
                         steps=len(rewards), duration_s=duration)


def test_ranking_math_by_hand():
    sweep = _sweep('seeds = 2\n[grid]\n"optim.lr" = [1e-3, 3e-4, 1e-4]')
    outcomes = [
        # point 0: 8/16 and 12/16 -> mean 0.625, sd sqrt(((0.5-0.625)^2 + (0.75-0.625)^2) / 1) = 0.1767767
        _outcome("a0", 0, 0, 0.5, [0.0, 0.5], duration=10.0),
        _outcome("a1", 0, 1, 0.75, [0.5, 1.0], duration=20.0),
        # point 1: 12/16 and 12/16 -> mean 0.75, sd 0; ranks first
        _outcome("b0", 1, 0, 0.75, [0.25, 0.25]),
        _outcome("b1", 1, 1, 0.75, [0.25, 0.75]),
        # point 2: one seed failed; the other 10/16
        TenantOutcome(name="c0", point=2, seed=0, error="EnvError: broken"),
        _outcome("c1", 2, 1, 0.625, [1.0, 1.0, 1.0]),
    ]
    first, second, third = rank_points(sweep.points, outcomes)
    assert (first.rank, first.point, second.point, third.point) == (1, 1, 2, 0)
    assert third.accuracy_mean == pytest.approx(0.625) and third.accuracy_std == pytest.approx(0.1767767)
    assert (third.accuracy_min, third.accuracy_max) == (0.5, 0.75)
    assert (third.correct, third.total) == (20, 32)  # pooled over seeds: 8 + 12 of 16 + 16
    assert (third.ci_low, third.ci_high) == pytest.approx(wilson_interval(20, 32))
    assert third.reward_area == pytest.approx((0.25 + 0.75) / 2)  # mean over seeds of each curve's mean
    assert (third.steps, third.duration_s) == (2.0, 15.0)
    assert first.accuracy_std == 0.0 and first.reward_area == pytest.approx(0.375)
    assert second.failed == ["c0"] and second.tenants == ["c0", "c1"] and second.accuracy_std == 0.0
    assert (second.correct, second.total, second.steps) == (10, 16, 3.0)


def test_ties_on_accuracy_go_to_the_larger_reward_area_and_points_with_no_finished_tenant_come_last():
    sweep = _sweep('[grid]\n"optim.lr" = [1e-3, 3e-4, 1e-4]')
    outcomes = [TenantOutcome(name="x", point=0, seed=0, error="boom"),
                _outcome("y", 1, 0, 0.5, [0.1]), _outcome("z", 2, 0, 0.5, [0.9])]
    rows = rank_points(sweep.points, outcomes)
    assert [r.point for r in rows] == [2, 1, 0]
    assert rows[2].accuracy_mean is None and rows[2].ci_low is None and (rows[2].correct, rows[2].total) == (0, 0)


# ----------------------------------------------------------------------------- the command on a fake runtime


@pytest.fixture(autouse=True)
def _quiet_vllm(monkeypatch, keep_structlog_config):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")


def _fake_runtime(results_of, seen):
    """clora.runtime stand-in: run_many returns ``results_of(experiment)`` for each experiment."""

    class Runtime:
        def __init__(self, config, *, run_dir=None, console_level="info"):
            self.config = config

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

        async def run_many(self, experiments, on_step=None):
            seen["names"] = [e.name for e in experiments]
            return {e.name: results_of(e) for e in experiments}

    module = types.ModuleType("clora.runtime")
    module.Runtime = Runtime
    return module


def _result(exp, accuracy_end: float) -> ExperimentResult:
    steps = [StepRecord(step=i, adapter_version=i, reward_mean=0.1 * i, time_rollout_s=1.0, time_train_s=1.0,
                        time_sync_s=0.1, trained=True) for i in range(1, exp.steps + 1)]
    return ExperimentResult(tenant=exp.name, steps=steps, accuracy_start=0.25, accuracy_end=accuracy_end,
                            started_at=100.0, finished_at=130.0, tokens_sampled=10, held_out=64)


def test_sweep_command_ranks_writes_results_and_the_picture(tmp_path, capsys, monkeypatch):
    seen = {}

    def results_of(exp):  # the lower learning rate wins; cispo at lr 1e-3 seed 1 fails
        if exp.name == "lr-0.001_kind-cispo_s1":
            return RuntimeError("env broke")
        return _result(exp, 0.75 if exp.optim.lr < 1e-3 else 0.5 - 0.25 * exp.seed)

    monkeypatch.setitem(sys.modules, "clora.runtime", _fake_runtime(results_of, seen))
    monkeypatch.setenv("COLUMNS", "220")  # the ranked table on one line per point
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    run_dir = tmp_path / "run"
    assert main(["sweep", str(path), "--run-dir", str(run_dir)]) == EXIT_FAILED  # one tenant failed
    out = capsys.readouterr().out
    assert len(seen["names"]) == 8 and "lr-0.001_kind-cispo_s1 failed" in out and "env broke" in out
    document = json.loads((run_dir / "results.json").read_text())
    ranked = [(p["rank"], p["label"]) for p in document["points"]]
    assert ranked[:2] == [(1, "lr-0.0003_kind-ppo"), (2, "lr-0.0003_kind-cispo")]
    lr3 = {p["label"]: p for p in document["points"]}["lr-0.001_kind-ppo"]
    assert (lr3["accuracy_mean"], lr3["correct"], lr3["total"]) == (0.375, 48, 128)  # 32 + 16 of 64 + 64
    assert lr3["reward_area"] == pytest.approx(0.2) and lr3["duration_s"] == 30.0
    assert document["seeds"] == [0, 1] and len(document["tenants"]) == 8 and document["wall_s"] >= 0
    failed = {t["name"]: t for t in document["tenants"]}["lr-0.001_kind-cispo_s1"]
    assert failed["error"] == "RuntimeError: env broke" and failed["experiment"]["loss"]["kind"] == "cispo"
    assert (run_dir / "rewards.png").stat().st_size > 10_000
    assert (run_dir / "sweep.toml").read_text() == SWEEP and (run_dir / "config.toml").is_file()
    table = [line for line in out.splitlines() if "lr-0.0003_kind-ppo " in line]
    assert table and "75% ± 0%" in table[0] and "96/128" in table[0]


def test_check_lists_the_tenants_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "clora.runtime", None)  # importing it would fail the test
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    assert main(["sweep", str(path), "--check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "8 tenants (4 points x 2 seeds) on tiny" in out and "lr-0.0003_kind-cispo_s1" in out
    assert not (tmp_path / "runs").exists()
    for example in ("sweep.toml", "recipe.toml"):
        assert main(["sweep", str(ROOT / "examples" / example), "--check"]) == EXIT_OK, example


@pytest.mark.parametrize(
    ("runtime", "base", "message"),
    [
        ('model = {{ source = "{tmp}/no-model" }}', "", "model directory '{tmp}/no-model' does not exist"),
        ('model = {{ source = "tiny" }}', "lora = { target_modules = ['qkv_proj'] }",
         "experiments.lr-0.001_s0.lora.target_modules: target module 'qkv_proj' does not exist in the base model"),
    ],
)
def test_what_would_fail_after_the_engine_start_fails_before_it(tmp_path, capsys, monkeypatch, runtime, base,
                                                                 message):
    """--check and the run check the base model and every tenant's LoRA targets (clora.preflight):
    exit 2, one line naming the sweep file, no runtime and no run folder."""
    monkeypatch.setitem(sys.modules, "clora.runtime", None)  # importing it would fail the test
    path = tmp_path / "sweep.toml"
    path.write_text(f'seeds = 1\n[runtime]\n{runtime.format(tmp=tmp_path)}\n[base]\nsteps = 1\n{base}\n'
                    '[grid]\n"optim.lr" = [1e-3]\n')
    for extra in (["--check"], []):
        assert main(["sweep", str(path), "--run-dir", str(tmp_path / "run"), *extra]) == EXIT_USAGE
        lines = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith(f"clora sweep: error: {path}: "), lines
        assert message.format(tmp=tmp_path) in lines[0], lines
        assert not (tmp_path / "run").exists()


def test_a_bad_sweep_file_exits_2_with_one_line_naming_file_and_field(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[grid]\n"optim.lrr" = [1e-3]')
    assert main(["sweep", str(path)]) == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"clora sweep: error: {path}: grid.optim.lrr: unknown field")
    assert main(["sweep", str(tmp_path / "missing.toml")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_help_lists_the_sweep_command(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "sweep" in capsys.readouterr().out
    assert main(["sweep", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--check" in out and "--resume" in out and "--run-dir" in out
