"""``clora bench concurrency --peer trl``: TRL's GRPOTrainer as the peer, on the single-turn task.

The fast tests check the settings TRL gets (the same budget as the clora experiment), the problems it
trains on (the tenant's own stream) and the table (rows per task variant, ratios within one variant).
The ``slow`` test runs a real TRL peer process on the tiny model (imports alone take a minute here).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import msgspec
import pytest

from clora.bench.concurrency import QUICK, build_parser, experiments, settings_from_args
from clora.bench.metrics import aggregate
from clora.bench.peers import peer_comparison
from clora.bench.report import markdown_table, rows_with_ratios
from clora.bench.trl_peer import check_trl_experiment, grpo_config_kwargs, training_prompts
from clora.config import LossConfig, ModelConfig, OptimConfig
from clora.envs import make_env
from clora.errors import ConfigError
from clora.tenant.actor import ExperimentResult, StepRecord


def _single(i: int = 0):
    return experiments(QUICK, i + 1, turns="single")[i]


def test_peer_trl_adds_the_single_turn_task_and_bare_peer_stays_the_loop():
    s = settings_from_args(build_parser().parse_args(["--quick", "--peer", "trl"]))
    assert s.peer == ("trl",) and s.turns == ("multi", "single")
    s = settings_from_args(build_parser().parse_args(["--quick", "--peer", "trl,loop", "--turns", "single"]))
    assert s.peer == ("trl", "loop") and s.turns == ("single",)
    s = settings_from_args(build_parser().parse_args(["--quick", "--peer"]))
    assert s.peer == ("loop",) and s.turns == ("multi",)
    for bad in (["--peer", "tlr"], ["--turns", "two"]):
        with pytest.raises(SystemExit, match="choose from"):
            settings_from_args(build_parser().parse_args(bad))


def test_single_turn_experiments_are_the_multi_turn_ones_answered_in_one_turn():
    multi, single = experiments(QUICK, 2), experiments(QUICK, 2, turns="single")
    assert [e.name for e in single] == ["st_exp0", "st_exp1"]
    for m, st in zip(multi, single):
        assert st.env.single_turn and not m.env.single_turn
        assert msgspec.structs.replace(st, name=m.name, env=m.env) == m  # nothing else differs


def test_grpo_config_is_the_experiments_budget():
    exp = _single(1)
    kw = grpo_config_kwargs(exp, bf16=False, output_dir="/tmp/x")
    assert kw["per_device_train_batch_size"] == exp.prompts_per_step * exp.group_size
    assert kw["num_generations"] == exp.group_size
    assert (kw["gradient_accumulation_steps"], kw["steps_per_generation"], kw["num_iterations"]) == (1, 1, 1)
    assert kw["max_steps"] == exp.steps and kw["max_completion_length"] == exp.max_tokens
    assert kw["temperature"] == exp.temperature and kw["learning_rate"] == exp.optim.lr == 2e-3
    assert kw["max_grad_norm"] == exp.optim.grad_clip and kw["seed"] == exp.seed == 1
    assert kw["loss_type"] == "dapo" and kw["epsilon"] == kw["epsilon_high"] == 0.2 and kw["beta"] == 0.0
    assert kw["scale_rewards"] == "group" and kw["shuffle_dataset"] is False
    assert kw["gradient_checkpointing"] is False and kw["bf16"] is False
    sequences = msgspec.structs.replace(exp, loss=LossConfig(normalize="sequences"), advantage="grpo_no_std")
    kw = grpo_config_kwargs(sequences, bf16=True, output_dir="/tmp/x")
    assert kw["loss_type"] == "grpo" and kw["scale_rewards"] == "none" and kw["bf16"] is True


def test_what_trl_cannot_run_fails_clearly():
    with pytest.raises(ConfigError, match="single-turn"):
        check_trl_experiment(experiments(QUICK, 1)[0])
    with pytest.raises(ConfigError, match="no TRL GRPO equivalent"):
        check_trl_experiment(msgspec.structs.replace(_single(), loss=LossConfig(kind="importance_sampling")))
    with pytest.raises(ConfigError, match="constant learning rate"):
        check_trl_experiment(msgspec.structs.replace(_single(), optim=OptimConfig(lr_schedule="cosine")))


def test_trl_trains_on_the_problems_a_clora_tenant_draws_in_order():
    exp = msgspec.structs.replace(_single(), steps=3, prompts_per_step=2)
    rows = training_prompts(exp)
    env, rng = make_env(exp.env), random.Random(exp.seed)  # the tenant's stream (clora.tenant.actor)
    drawn = [p for _ in range(exp.steps) for p in env.train_problems(rng, exp.prompts_per_step)]
    assert [r["question"] for r in rows] == [p.question for p in drawn]
    assert [r["answer"] for r in rows] == [p.answer for p in drawn]
    assert rows[0]["prompt"] == env.start(drawn[0]).initial_messages()


def _result(name: str, end: float, acc: float) -> ExperimentResult:
    step = StepRecord(step=1, adapter_version=1, reward_mean=acc, time_rollout_s=1.0, time_train_s=1.0,
                      time_sync_s=0.0, trained=True)
    return ExperimentResult(tenant=name, steps=[step], accuracy_start=0.0, accuracy_end=acc, started_at=0.0,
                            finished_at=end, tokens_sampled=10)


def test_rows_compare_within_one_task_variant():
    multi = [aggregate("serial_cold", [_result("a", 100.0, 0.5)], 0.0),
             aggregate("concurrent", [_result("a", 50.0, 0.5)], 0.0)]
    single = [replace(aggregate("serial_cold", [_result("s", 40.0, 0.25)], 0.0), turns="single"),
              replace(aggregate("concurrent", [_result("s", 20.0, 0.5)], 0.0), turns="single"),
              replace(aggregate("trl", [_result("t", 80.0, 0.25)], 0.0), turns="single")]
    items = rows_with_ratios(single + multi)
    assert [(i["mode"], i["turns"]) for i in items] == [
        ("serial_cold", "multi"), ("concurrent", "multi"), ("serial_cold", "single"), ("concurrent", "single"),
        ("trl", "single")]
    assert items[1]["ratios"]["final_speedup"] == pytest.approx(2.0)  # multi against multi
    assert items[3]["ratios"]["final_speedup"] == pytest.approx(2.0)  # single against single (40 / 20)
    assert items[4]["ratios"]["final_speedup"] == pytest.approx(0.5)
    [entry] = peer_comparison(items)
    assert (entry["peer"], entry["turns"], entry["n"]) == ("trl", "single", 1)
    assert entry["concurrent_speedup_vs_peer"] == pytest.approx(4.0)  # 80 / 20, not 80 / 50 (multi)
    assert entry["serial_cold_speedup_vs_peer"] == pytest.approx(2.0)
    assert entry["peer_accuracy_end"] == 0.25 and entry["concurrent_accuracy_end"] == 0.5
    assert "serial_warm_final_s" not in entry
    lines = markdown_table(items).splitlines()
    assert lines[0].startswith("| mode | turns | N |") and lines[-1].startswith("| trl | single | 1 |")


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_a_trl_peer_process_gives_a_well_formed_row():
    from clora.bench.peers import run_peer
    from clora.bench.trl_peer import trl_available

    if not trl_available():
        pytest.skip("TRL is not installed (pip install -e '.[trl]')")
    exps = [msgspec.structs.replace(e, steps=2) for e in experiments(QUICK, 1, turns="single")]
    seen: list[tuple[str, int]] = []
    [row] = await run_peer("trl", exps, ModelConfig(source="tiny", max_model_len=QUICK.max_model_len), (1, 2),
                           count=1, bf16=False, samples_per_step=QUICK.samples_per_step,
                           on_step=lambda name, record: seen.append((name, record.step)))
    assert seen == [("st_exp0", 1), ("st_exp0", 2)]  # progress streamed from the child process
    assert (row.mode, row.n) == ("trl", 1)
    assert row.first_s == row.final_s == row.mean_s > row.step_s * 2  # the clock includes start and evals
    assert row.rollout_s > 0 and row.train_s > 0 and row.sync_s == 0.0
    assert len(row.reward_curve) == 2 and all(0.0 <= r <= 1.0 for r in row.reward_curve)
    assert len(row.accuracy_start) == len(row.accuracy_end) == 1
    assert all(0.0 <= a <= 1.0 for a in row.accuracy_start + row.accuracy_end)
    # rollouts: steps x prompts x group completions of 1..max_tokens tokens, plus the held-out evals
    rollouts = 2 * QUICK.samples_per_step
    assert rollouts <= row.tokens <= (rollouts + 2 * QUICK.held_out_size) * QUICK.max_tokens
    assert row.peak_rss_gb > 0.1 and not math.isnan(row.tokens_per_s)
