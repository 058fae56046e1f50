"""An experiment's schedule and loss settings reach the trainer resolved (scripted engine, real trainer)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import clora.runtime
from clora import events
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.testing import Events, FakeEngine, ToyEnv
from clora.trainer import scheduled_lr

pytestmark = pytest.mark.timeout(300)


async def test_experiment_schedule_and_loss_settings_reach_the_trainer(tiny_model_dir, tmp_path):
    """A cosine schedule without total_steps spans the experiment's steps, a "constant" normalisation
    without a constant uses max_tokens, and a KL penalty reports `kl`: the tenant sends the
    resolved configs (an unresolved schedule or constant would be refused by the trainer)."""
    exp = ExperimentConfig(
        name="sched", lora=LoraConfig(rank=4, alpha=8.0), env=EnvConfig(max_turns=1), steps=4, prompts_per_step=1,
        group_size=2, max_tokens=8, advantage="grpo_no_std",
        optim=OptimConfig(lr=1e-2, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.2),
        loss=LossConfig(kind="cispo", clip_low=1.0, clip_high=4.0, kl_coef=0.05, kl_estimator="k1",
                        normalize="constant"),
    )
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path))
    # a group's two answers differ in length parity: ToyEnv's rewards spread, every step trains
    engine = FakeEngine(lambda request: "ab" if request.repeat % 2 == 0 else "abc",
                        tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        result = await rt.run(exp, env=ToyEnv())
    assert len(result.steps) == 4 and all(s.trained for s in result.steps)
    steps = Events.from_run(tmp_path).named(events.TRAINER_STEP, tenant="sched")
    assert [e["lr"] for e in steps] == pytest.approx([scheduled_lr(exp.resolved_optim, n) for n in range(4)])
    assert steps[0]["lr"] == 1e-2 and steps[-1]["lr"] < 1e-2  # warmup of 1 step, then the cosine decay
    assert all("kl" in e and "time/base_fwd" in e for e in steps)
