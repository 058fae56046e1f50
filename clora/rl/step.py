"""One RL step's data path, top to bottom: problems -> trajectory groups -> advantages -> training data;
and the held-out evaluation. The TenantActor and the peer baseline both run exactly this.

    problems = env.train_problems(rng, prompts_per_step)
    groups = await sample_groups(sample, renderer, env, problems, group_size, **episode)   # (P, G)
    batch = to_training_data(problems, groups, advantage="grpo")                           # rewards, data
    ... train on batch.data ...
    score = await evaluate(sample, renderer, env, env.held_out(), **episode)               # correct of total

Sampling is injected (``SampleFn``), so the same path runs on vLLM, on HF generate and on fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import torch

from actors.gather import gather_first_error
from clora.config import ExperimentConfig
from clora.envs.base import Env, Problem
from clora.messages import Datum, SamplingSpec
from clora.rl.accuracy import HeldOutScore
from clora.rl.advantages import AdvantageKind, group_advantages
from clora.rl.chat import ChatRenderer
from clora.rl.rollout import (
    SampleFn,
    StepFn,
    Trajectory,
    derive_seed,
    run_episode,
    run_group,
    start_episode,
    to_datum,
)
from clora.envs.stepping import step_on_loop

__all__ = ["EpisodeSettings", "TrainingBatch", "episode_settings", "evaluate", "sample_groups", "to_training_data"]


class EpisodeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How every episode of a step runs: turns, sampling, the context limit."""

    max_turns: int
    sampling: SamplingSpec
    max_model_len: int


def episode_settings(
    experiment: ExperimentConfig, max_model_len: int, *, step: int, evaluation: bool = False
) -> EpisodeSettings:
    """The episodes of one training step of ``experiment`` (or its held-out evaluation at ``step``:
    greedy). Sampling is seeded from ``experiment.seed`` and the step; ``sample_groups`` / ``evaluate``
    derive one seed per problem, ``run_group`` per episode and ``run_episode`` per turn, so a rerun of
    the same config asks the engine for the same seeded requests (docs/reliability.md#seeds)."""
    return EpisodeSettings(
        max_turns=experiment.env.max_turns, max_model_len=max_model_len,
        sampling=SamplingSpec(
            n=1, max_tokens=experiment.max_tokens, temperature=0.0 if evaluation else experiment.temperature,
            seed=derive_seed(experiment.seed, "eval" if evaluation else "train", step),
        ),
    )


def _for_problem(sampling: SamplingSpec, index: int) -> SamplingSpec:
    return msgspec.structs.replace(sampling, seed=derive_seed(sampling.seed, "problem", index))


@dataclass(frozen=True)
class TrainingBatch:
    """One step's groups with their rewards and advantages, and the data that carries a signal."""

    problems: Sequence[Problem]  # (P,)
    groups: list[list[Trajectory]]  # (P, G)
    rewards: torch.Tensor  # (P, G)
    advantages: torch.Tensor  # (P, G)
    data: list[Datum]  # the samples whose advantage is not zero, group by group

    @property
    def reward_mean(self) -> float:
        return self.rewards.mean().item()

    @property
    def finite(self) -> bool:
        """False when finite rewards were too large for float32 statistics: nothing to train."""
        return bool(torch.isfinite(self.advantages).all())


async def sample_groups(
    sample: SampleFn,
    renderer: ChatRenderer,
    env: Env,
    problems: Sequence[Problem],
    group_size: int,
    settings: EpisodeSettings,
    *,
    step_env: StepFn = step_on_loop,
) -> list[list[Trajectory]]:
    """``group_size`` episodes of every problem, all at once; result (P, G). The first failure
    cancels the rest and is raised as itself."""
    return await gather_first_error(
        run_group(
            sample, renderer, env, problem, group_size, max_turns=settings.max_turns,
            sampling=_for_problem(settings.sampling, i), max_model_len=settings.max_model_len, step_env=step_env,
        )
        for i, problem in enumerate(problems)
    )


def to_training_data(
    problems: Sequence[Problem], groups: list[list[Trajectory]], advantage: AdvantageKind
) -> TrainingBatch:
    """Group advantages of the rewards, and one Datum per sample with a non-zero advantage. When the
    advantages are not finite, ``data`` is empty and ``finite`` is False."""
    rewards = torch.tensor([[traj.reward for traj in group] for group in groups])  # (P, G)
    advantages = group_advantages(rewards, kind=advantage)  # (P, G)
    data: list[Datum] = []
    if torch.isfinite(advantages).all():
        for group, group_adv in zip(groups, advantages.tolist(), strict=True):
            data += [to_datum(traj, adv) for traj, adv in zip(group, group_adv, strict=True) if adv != 0.0]
    return TrainingBatch(problems=problems, groups=groups, rewards=rewards, advantages=advantages, data=data)


async def evaluate(
    sample: SampleFn,
    renderer: ChatRenderer,
    env: Env,
    problems: Sequence[Problem],
    settings: EpisodeSettings,
    *,
    step_env: StepFn = step_on_loop,
) -> HeldOutScore:
    """How many of ``problems`` are solved: one episode each with ``settings.sampling`` (greedy for
    held-out evaluation), every problem in flight at once (the sampler batches them); a problem
    counts when its reward is at least 1.0, also in its kind's count (``HeldOutScore.by_kind``)."""
    stop = tuple(dict.fromkeys((*settings.sampling.stop, *getattr(env, "stop_sequences", ()))))
    spec = msgspec.structs.replace(settings.sampling, stop=stop)
    trajectories = await gather_first_error(
        run_episode(
            sample, renderer, start_episode(env, problem), max_turns=settings.max_turns,
            sampling=_for_problem(spec, i), max_model_len=settings.max_model_len, step_env=step_env,
        )
        for i, problem in enumerate(problems)
    )
    solved = [t.reward >= 1.0 for t in trajectories]
    by_kind: dict[str, tuple[int, int]] = {}
    for problem, right in zip(problems, solved):
        if problem.kind:
            correct, total = by_kind.get(problem.kind, (0, 0))
            by_kind[problem.kind] = (correct + right, total + 1)
    return HeldOutScore(correct=sum(solved), total=len(solved), by_kind=dict(sorted(by_kind.items())))
