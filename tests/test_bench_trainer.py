"""clora bench trainer --workload rollout: the data's shape, and one tiny run of every mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from clora.bench.trainer import main
from clora.bench.trainer_rollout import MODES, RolloutShape, bench_rollout_core, rollout_data
from clora.config import TrainerConfig
from clora.trainer import TrainerCore

SMALL = RolloutShape(groups=2, group_size=3, system_len=24, question_len=8, completion_len=12, tool_len=3)


def test_rollout_data_is_groups_sharing_a_prompt_with_multi_turn_completions():
    data = rollout_data(500, SMALL, seed=1)
    assert len(data) == 6
    prompt = 24 + 8
    for g in range(2):
        group = data[3 * g : 3 * g + 3]
        assert all(d.tokens[:prompt] == group[0].tokens[:prompt] for d in group)  # a group shares its prompt
    assert data[0].tokens[:24] == data[3].tokens[:24] and data[0].tokens[24:32] != data[3].tokens[24:32]
    for d in data:
        completion = d.loss_mask[prompt:]
        assert not any(d.loss_mask[:prompt])
        assert completion.count(0.0) == 3 and completion[0] == completion[-1] == 1.0  # a tool turn inside
        assert 9 <= len(completion) <= 15
        assert {abs(a) for a in d.advantages} <= {0.0, 1.0}


def test_bench_rollout_runs_every_mode_on_the_same_data(tiny_model_dir: Path):
    core = TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig(micro_batch_size=4))
    timings = []
    rows = bench_rollout_core(core, shape=SMALL, steps=1, warmup=1, on_step=timings.append)
    assert [(t.mode, t.step, t.warmup) for t in timings] == [(m, i, i == 0) for i in (0, 1) for m in MODES]
    by_mode = {r.mode: r for r in rows}
    assert tuple(by_mode) == MODES
    assert len({r.tokens_trained for r in rows}) == 1  # same data
    naive, logits_only, shared = (by_mode[m] for m in MODES)
    assert naive.speedup == 1.0 and shared.speedup > 0
    assert naive.lm_head_positions == naive.tokens_computed  # logits at every position
    assert logits_only.tokens_computed == naive.tokens_computed  # nothing shared, same padding
    assert logits_only.lm_head_positions == logits_only.tokens_trained < naive.lm_head_positions
    assert shared.tokens_computed < 0.6 * naive.tokens_computed
    assert shared.computed_per_trained == pytest.approx(shared.tokens_computed / shared.tokens_trained)
    assert all(r.cpu_s > 0 for r in rows) and all(t.cpu_seconds > 0 for t in timings)
    assert not core.stores and core.shared_prefix  # tenants removed, settings restored


def test_cli_prints_the_rollout_table(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]):
    main(["--model", str(tiny_model_dir), "--workload", "rollout", "--precision", "fp32", "--steps", "1",
          "--warmup", "0", "--groups", "1", "--group-size", "2", "--system-len", "16", "--question-len", "4",
          "--completion-len", "8", "--tool-len", "0", "--modes", "naive", "shared"])
    captured = capsys.readouterr()
    out = captured.out
    assert "naive" in out and "shared" in out and "comp/train" in out and "logits_only" not in out
    progress = [line for line in captured.err.splitlines() if line.startswith("fp32 ")]  # one per timed step
    assert [line.split()[1] for line in progress] == ["naive", "shared"]
    assert all(" s CPU), " in line and "computed per trained token" in line for line in progress)
