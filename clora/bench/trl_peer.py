"""The TRL peer: one clora experiment run with Hugging Face TRL's ``GRPOTrainer``, in its own process.

``clora bench concurrency --peer trl`` runs each experiment as ``python -m clora.bench.trl_peer``:
a fresh process (the experiment's clock starts before it is spawned, so imports and the model load
count) that builds a ``GRPOTrainer`` with the experiment's settings (``grpo_config``), measures
held-out accuracy before and after training the way a clora tenant does (clora's ``evaluate``:
greedy, one episode per held-out problem, on the trainer's own PEFT model through
``HFBatchSampler``), and writes an ``ExperimentResult`` as JSON.

TRL 1.16 runs tool calls only in the chat template's own JSON tool-call format, for the chat
templates it knows, and ``transformers.generate`` in TRL takes no stop strings, so it cannot run the
multi-turn Calculator task: the TRL peer runs the single-turn variant (``env.single_turn``), whose
reward function is the env's own episode (``SingleTurnEpisode.step``). docs/benchmarks.md lists what
is the same on both sides and what is not.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec

from clora.config import ExperimentConfig, ModelConfig
from clora.errors import ConfigError, FatalError
from clora.tenant.actor import ExperimentResult, StepRecord

__all__ = ["TrlPeerError", "trl_available", "check_trl_experiment", "grpo_config_kwargs", "training_prompts",
           "run_trl_experiment", "run_trl_in_process", "main"]

_LOSS_TYPES = {"tokens": "dapo", "sequences": "grpo", "constant": "dr_grpo"}  # clora normalize -> TRL loss_type


class TrlPeerError(FatalError):
    """The TRL peer process failed (its output's tail is in the message)."""


def trl_available() -> bool:
    """Whether TRL is installed (the optional ``trl`` extra)."""
    return importlib.util.find_spec("trl") is not None


def check_trl_experiment(exp: ExperimentConfig) -> None:
    """``ConfigError`` for an experiment TRL's GRPOTrainer cannot run like clora does."""
    if exp.env.kind != "arithmetic" or not exp.env.single_turn:
        raise ConfigError(f"experiment {exp.name!r}: the TRL peer runs only the single-turn arithmetic task "
                          "(env.single_turn = true); TRL cannot run clora's multi-turn tool episodes")
    loss = exp.resolved_loss
    if loss.kind not in ("ppo", "cispo"):
        raise ConfigError(f"experiment {exp.name!r}: loss.kind {loss.kind!r} has no TRL GRPO equivalent "
                          "(use 'ppo' or 'cispo')")
    if loss.kl_coef > 0 and loss.kl_estimator != "k3":
        raise ConfigError(f"experiment {exp.name!r}: TRL's beta is the k3 estimator; loss.kl_estimator must be 'k3'")
    if exp.resolved_optim.lr_schedule != "constant" or exp.resolved_optim.warmup_steps:
        raise ConfigError(f"experiment {exp.name!r}: the TRL peer maps only a constant learning rate without warmup")


def grpo_config_kwargs(exp: ExperimentConfig, *, bf16: bool, output_dir: str) -> dict[str, Any]:
    """``GRPOConfig`` keyword arguments for ``exp``: one optimizer step per generation of
    prompts_per_step x group_size completions (on-policy, as a clora step), the same sampling, loss,
    advantage scaling and AdamW settings; logging, saving and gradient checkpointing off."""
    check_trl_experiment(exp)
    loss, optim = exp.resolved_loss, exp.resolved_optim
    return dict(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=exp.seed, data_seed=exp.seed, max_steps=exp.steps, shuffle_dataset=False,
        per_device_train_batch_size=exp.prompts_per_step * exp.group_size, num_generations=exp.group_size,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=exp.max_tokens, temperature=exp.temperature, top_p=1.0, top_k=0,
        learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=optim.beta1,
        adam_beta2=optim.beta2, adam_epsilon=optim.eps, weight_decay=optim.weight_decay,
        max_grad_norm=optim.grad_clip if optim.grad_clip > 0 else None,
        loss_type="cispo" if loss.kind == "cispo" else _LOSS_TYPES[loss.normalize],
        epsilon=loss.clip_low, epsilon_high=loss.clip_high if loss.kind == "ppo" else 1.0 + loss.clip_high,
        beta=loss.kl_coef, scale_rewards="group" if exp.advantage == "grpo" else "none",
        bf16=bf16, fp16=False, gradient_checkpointing=False, use_cpu=not _cuda(),
        use_vllm=False, remove_unused_columns=False, log_completions=False,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_prompts(exp: ExperimentConfig) -> list[dict[str, Any]]:
    """The rows of TRL's train dataset: the problems a clora tenant draws, step by step, in order
    (the tenant's ``random.Random(seed)`` stream), each with its opening messages."""
    from clora.envs import make_env

    env, rng = make_env(exp.env), random.Random(exp.seed)
    rows = []
    for _ in range(exp.steps):
        for problem in env.train_problems(rng, exp.prompts_per_step):
            rows.append({"prompt": env.start(problem).initial_messages(), "question": problem.question,
                         "answer": problem.answer, "problem_id": problem.id})
    return rows


class _StepClock:
    """Per-step wall-clock spans and rewards, filled by the trainer subclass and the reward function."""

    def __init__(self) -> None:
        self.step_at: list[tuple[float, float]] = []
        self.rollout_at: list[tuple[float, float]] = []
        self.rewards: list[list[float]] = []
        self.tokens = 0
        self._began = 0.0

    def records(self) -> list[StepRecord]:
        out = []
        for i, (begin, end) in enumerate(self.step_at):
            r0, r1 = self.rollout_at[i] if i < len(self.rollout_at) else (begin, begin)
            rewards = self.rewards[i] if i < len(self.rewards) else []
            rollout = r1 - r0
            out.append(StepRecord(step=i + 1, adapter_version=i + 1, reward_mean=statistics.fmean(rewards) if rewards
                                  else 0.0, time_rollout_s=rollout, time_train_s=(end - begin) - rollout,
                                  time_sync_s=0.0, trained=True, rollout_at=(r0, r1), train_at=(r1, end)))
        return out


def _reward_function(exp: ExperimentConfig, clock: _StepClock) -> Callable[..., list[float]]:
    """TRL reward function: the env's own episode scores each completion (the first turn's text)."""
    from clora.envs import Problem, make_env

    env = make_env(exp.env)

    def clora_env_reward(prompts: Sequence[Any], completions: Sequence[Any], question: Sequence[str],
                         answer: Sequence[str], problem_id: Sequence[str], completion_ids: Sequence[Sequence[int]],
                         **_: Any) -> list[float]:
        rewards = []
        for completion, q, a, pid in zip(completions, question, answer, problem_id, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            rewards.append(float(env.start(Problem(id=pid, question=q, answer=a)).step(text).reward))
        clock.rewards.append(rewards)
        clock.tokens += sum(len(ids) for ids in completion_ids)
        return rewards

    return clora_env_reward


def run_trl_in_process(exp: ExperimentConfig, model: ModelConfig, *, bf16: bool = False,
                       on_step: Callable[[str, StepRecord], None] | None = None) -> ExperimentResult:
    """Train ``exp`` with TRL's GRPOTrainer in this process, with held-out accuracy before and after."""
    check_trl_experiment(exp)
    started = time.time()
    import datasets
    import peft
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from clora.bench.peer import HFBatchSampler
    from clora.envs import make_env
    from clora.models import resolve_model
    from clora.rl.chat import ChatRenderer
    from clora.rl.step import episode_settings, evaluate

    model_dir = str(resolve_model(model))
    clock = _StepClock()

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            began = time.time()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                clock.rollout_at.append((began, time.time()))

    class StepSpans(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock._began = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_at.append((clock._began, time.time()))
            if on_step is not None:
                on_step(exp.name, clock.records()[-1])

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    with tempfile.TemporaryDirectory(prefix="clora-trl-") as tmp:
        trainer = TimedGRPOTrainer(
            model=model_dir, reward_funcs=_reward_function(exp, clock),
            args=GRPOConfig(**grpo_config_kwargs(exp, bf16=bf16, output_dir=tmp)),
            train_dataset=datasets.Dataset.from_list(training_prompts(exp)), processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=exp.lora.rank, lora_alpha=exp.lora.alpha, lora_dropout=0.0,
                                        target_modules=list(exp.lora.target_modules), task_type="CAUSAL_LM"),
            callbacks=[StepSpans()],
        )
        renderer = ChatRenderer(tokenizer)
        sampler = HFBatchSampler(trainer.model, tokenizer, renderer)
        env = make_env(exp.env)
        eval_tokens = 0

        async def held_out(step: int) -> Any:
            nonlocal eval_tokens

            async def sample(prompt: list[int], spec: Any) -> Any:
                nonlocal eval_tokens
                completion, version = await sampler(prompt, spec)
                eval_tokens += len(completion.token_ids)
                return completion, version

            settings = episode_settings(exp, model.max_model_len, step=step, evaluation=True)
            return await evaluate(sample, renderer, env, env.held_out(), settings)

        score_start = asyncio.run(held_out(0))
        trainer.train()
        score_end = asyncio.run(held_out(exp.steps))
    return ExperimentResult(tenant=exp.name, steps=clock.records(), accuracy_start=score_start.accuracy,
                            accuracy_end=score_end.accuracy, started_at=started, finished_at=time.time(),
                            tokens_sampled=clock.tokens + eval_tokens, held_out=score_end.total)


async def run_trl_experiment(exp: ExperimentConfig, model: ModelConfig, *, bf16: bool = False,
                             on_step: Callable[[str, StepRecord], None] | None = None) -> ExperimentResult:
    """``exp`` with TRL in a fresh ``python -m clora.bench.trl_peer`` process; ``started_at`` is taken
    before the process is spawned, so the experiment time includes its start, imports and model load."""
    check_trl_experiment(exp)
    if not trl_available():
        raise ConfigError("the TRL peer needs TRL: pip install -e '.[trl]' (or `make bench-trl`)")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="clora-trl-peer-") as tmp:
        spec_path, result_path = Path(tmp) / "experiment.json", Path(tmp) / "result.json"
        spec_path.write_bytes(msgspec.json.encode({"experiment": exp, "model": model, "bf16": bf16}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clora.bench.trl_peer", str(spec_path), str(result_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        lines: list[str] = []
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines = (lines + [line])[-40:]
            if on_step is not None and line.startswith("clora-trl-step "):
                record = msgspec.json.decode(line.partition(" ")[2], type=StepRecord)
                on_step(exp.name, record)
        code = await proc.wait()
        if code != 0 or not result_path.exists():
            raise TrlPeerError(f"TRL peer for {exp.name!r} exited with {code}:\n" + "\n".join(lines))
        result = msgspec.json.decode(result_path.read_bytes(), type=ExperimentResult)
    return msgspec.structs.replace(result, started_at=started)


class _Spec(msgspec.Struct):
    experiment: ExperimentConfig
    model: ModelConfig
    bf16: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clora.bench.trl_peer SPEC.json RESULT.json``: one experiment, its result as JSON."""
    p = argparse.ArgumentParser(prog="python -m clora.bench.trl_peer", description=main.__doc__)
    p.add_argument("spec")
    p.add_argument("result")
    args = p.parse_args(argv)
    spec = msgspec.json.decode(Path(args.spec).read_bytes(), type=_Spec)

    def progress(tenant: str, record: StepRecord) -> None:
        print("clora-trl-step " + msgspec.json.encode(record).decode(), flush=True)

    result = run_trl_in_process(spec.experiment, spec.model, bf16=spec.bf16, on_step=progress)
    Path(args.result).write_bytes(msgspec.json.encode(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
