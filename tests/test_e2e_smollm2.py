"""End to end on the real SmolLM2-135M-Instruct: a tenant learns the arithmetic tool-use task.

Task and budget (chosen so the rise is reliable on a 2-core CPU in a few minutes): difficulty 0
(one operation, small numbers) with the single addition worked example (``examples="addition"``: with
the default ``each_op`` examples the untrained model already solves 31 of these 32 problems, measured
2026-11-30, so there is nothing left to learn), a fixed held-out split of 32 problems evaluated greedily, 8 RL
steps of 4 problems x 8 samples at temperature 0.7 (at 1.0 the 135M model's samples are almost
never well-formed, so groups carry no signal), PPO on LoRA rank 8 with lr 2e-3, bf16 autocast.
Held-out accuracy is measured before, after step 4 and after step 8; the best of the last two must
beat the start by 0.15 (runs at this lr sometimes swing down after learning the format). The untrained model solves
about a quarter of the held-out problems thanks to the worked example in the prompt; most
failures are format errors (no tool call, an expression as the final answer), which RL removes
quickly.
"""

from __future__ import annotations

import pytest

from clora.config import (
    EngineConfig, EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainerConfig,
)
from clora.events import read_events

pytestmark = [pytest.mark.vllm, pytest.mark.smollm2, pytest.mark.timeout(1800)]

MIN_ACCURACY_GAIN = 0.15


async def test_smollm2_tenant_held_out_accuracy_rises(tmp_path):
    import clora

    experiment = ExperimentConfig(
        name="learner",
        lora=LoraConfig(rank=8, alpha=16),
        optim=OptimConfig(lr=2e-3),
        env=EnvConfig(kind="arithmetic", difficulty=0, examples="addition", held_out_size=32, seed=7),
        steps=8,
        prompts_per_step=4,
        group_size=8,
        max_tokens=32,
        temperature=0.7,
        eval_every=4,
        seed=0,
    )
    config = RuntimeConfig(
        model=ModelConfig(source="smollm2", dtype="auto", max_model_len=1024),
        engine=EngineConfig(max_loras=2, max_lora_rank=8),
        trainer=TrainerConfig(autocast_bf16="auto"),
        run_dir=str(tmp_path / "run"),
    )
    async with clora.Runtime(config, console_level="warning") as rt:
        result = await rt.run(experiment)

    curve = [round(s.reward_mean, 3) for s in result.steps]
    print(f"accuracy {result.accuracy_start:.3f} -> {result.steps[3].accuracy} (step 4) -> {result.accuracy_end:.3f}; "
          f"reward per step {curve}; "
          f"{result.duration_s:.0f} s")
    assert sum(s.trained for s in result.steps) >= 4, "most steps must carry a learning signal"
    midway = result.steps[3].accuracy
    assert midway is not None
    # lr 2e-3 learns the format in 2-4 steps; some runs then swing (one CI run: reward 0.88 at step 4,
    # 0.03 at step 7, greedy accuracy 0.0 at the end), so the rise is measured at the best of two evals.
    assert max(midway, result.accuracy_end) >= result.accuracy_start + MIN_ACCURACY_GAIN
    evals = [e for e in read_events(tmp_path / "run") if e["event"] == "tenant.eval"]
    assert [e["accuracy"] for e in evals] == [result.accuracy_start, midway, result.accuracy_end]
