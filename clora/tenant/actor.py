"""TenantActor: one RL experiment on one adapter.

Per step: draw problems, sample a group of G episodes per problem through the sampler (multi-turn,
tools run between turns), score them, compute group advantages, train one step, publish the new
version, and log one canonical ``tenant.step`` event. Held-out accuracy (greedy, one episode per
problem) is measured before the first step, every ``eval_every`` steps, and after the last.

Env steps run in the tenant's own thread under ``env.step_timeout_s`` (clora.envs.stepping), so a
hanging tool stalls only this tenant. A rollout or eval that fails with an env error (the env
raising, a bad reward, a step past its deadline) and a failed publish are tried again up to
``retries`` times (``tenant.retry`` events); after that the error ends this tenant only.

Checkpoints (when given a ``checkpoint_dir``; clora.tenant.checkpoints): after the initial eval,
every ``checkpoint_every`` steps, after the last step, and when the run stops early with a completed
step not yet saved. With ``resume=True`` a tenant that finds one restores it into the trainer,
publishes the restored version and goes on with the next step; with ``resume=False`` an old
checkpoint is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from actors import Actor, ActorRef, handler
from clora import events
from clora.rl.chat import ChatRenderer
from clora.checkpoint.format import BaseModelIdentity, TenantProgress, rng_state
from clora.config import ExperimentConfig
from clora.envs.stepping import EnvStepper
from clora.envs import Env
from clora.envs.base import Problem
from clora.errors import CheckpointError, EnvError, NonFiniteError, PublishError, StaleDataError
from clora.messages import (
    AddTenant,
    Completion,
    ExportAdapter,
    Publish,
    RemoveAdapter,
    RemoveTenant,
    SampleRequest,
    SampleResult,
    SamplingSpec,
    StoreState,
    TrainStep,
    TrainStepResult,
)
from clora.rl.accuracy import HeldOutScore
from clora.rl.step import episode_settings, evaluate, sample_groups, to_training_data
from clora.rl.rollout import Trajectory
from clora.tenant.base_scores import BaseScores, base_score_key
from clora.tenant.checkpoints import TenantCheckpoints
from clora.tenant.pipeline import pipelined

__all__ = ["ExperimentResult", "RunExperiment", "StepRecord", "TenantActor"]

T = TypeVar("T")


class RunExperiment(msgspec.Struct, frozen=True, tag=True):
    """Run the tenant's experiment to the end (or until cancelled)."""


class StepRecord(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    adapter_version: int
    reward_mean: float
    time_rollout_s: float
    time_train_s: float
    time_sync_s: float
    trained: bool
    accuracy: float | None = None
    rollout_at: tuple[float, float] | None = None  # wall clock (time.time()) span of the step's rollout
    train_at: tuple[float, float] | None = None  # ... of its train step (None: nothing trained)


class ExperimentResult(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    steps: list[StepRecord]
    accuracy_start: float
    accuracy_end: float
    started_at: float  # wall clock (time.time())
    finished_at: float
    tokens_sampled: int
    resumed_from_step: int | None = None  # the checkpointed step this run continued from
    held_out: int = 0  # problems in each held-out evaluation (accuracy = correct / held_out); 0: not known

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at

    @property
    def score_start(self) -> HeldOutScore:
        """The first evaluation as a count, with its 95% interval (``.interval``)."""
        return HeldOutScore.from_accuracy(self.accuracy_start, self.held_out)

    @property
    def score_end(self) -> HeldOutScore:
        """The last evaluation as a count, with its 95% interval (``.interval``)."""
        return HeldOutScore.from_accuracy(self.accuracy_end, self.held_out)


@dataclass(frozen=True)
class _Rollout:
    """One step's sampled groups, waiting to train."""

    problems: list[Problem]
    groups: list[list[Trajectory]]  # (prompts, group_size)
    t0: float  # perf_counter when the rollout started
    sampled_s: float  # its sampling time
    span: tuple[float, float] = (0.0, 0.0)  # wall clock (time.time()) start and end of the sampling
    resampled: bool = False  # sampled again after the trainer found it stale (stale_policy="resample")


class TenantActor(Actor):
    mailbox_size = 4
    inbox = RunExperiment

    def __init__(
        self,
        experiment: ExperimentConfig,
        *,
        env: Env,
        renderer: ChatRenderer,
        sampler: ActorRef,
        trainer: ActorRef,
        sync: ActorRef,
        max_model_len: int,
        adapter_dir: Path | None = None,
        on_step: Callable[[str, StepRecord], None] | None = None,
        checkpoint_dir: Path | None = None,
        base_model: BaseModelIdentity | None = None,
        resume: bool = False,
        base_scores: BaseScores | None = None,
    ) -> None:
        """``checkpoint_dir`` turns checkpoints on (``base_model`` is then required); ``resume``
        restores the checkpoint found there instead of deleting it. ``base_scores``: the runtime's shared
        base-model scores, for the evaluation before the first step (only for an env made from
        ``experiment.env``, whose held-out set the config fixes)."""
        super().__init__()
        self.experiment = experiment
        self.tenant = experiment.name
        self._env = env
        self._renderer = renderer
        self._sampler = sampler
        self._trainer = trainer
        self._sync = sync
        self._max_model_len = max_model_len
        self._adapter_dir = adapter_dir
        self._on_step = on_step
        self._rng = random.Random(experiment.seed)
        self._tokens_sampled = 0
        self._version = 0
        if checkpoint_dir is not None and base_model is None:
            raise ValueError(f"tenant {self.tenant!r}: a checkpoint_dir needs the base_model identity")
        self._resume = resume
        self._base_scores = base_scores
        self._resumed: TenantProgress | None = None  # the checkpoint's progress, when resumed
        self._checkpoint_dir, self._base_model = checkpoint_dir, base_model
        self._checkpoints: TenantCheckpoints | None = None  # made in on_start, where self.log is the system's
        self._step_state: StoreState | None = None  # the store copy the last TrainStep replied with
        self._env_steps = EnvStepper(self.tenant, experiment.env.step_timeout_s)
        self._rng_before: dict[int, Any] = {}  # step -> the RNG's state before its problems were drawn

    async def on_start(self) -> None:
        exp = self.experiment
        await self._trainer.ask(AddTenant(tenant=self.tenant, lora=exp.lora, optim=exp.resolved_optim))
        try:
            if self._checkpoint_dir is not None and self._base_model is not None:
                self._checkpoints = TenantCheckpoints(
                    self._checkpoint_dir, tenant=self.tenant, every=exp.checkpoint_every, last_step=exp.steps,
                    base_model=self._base_model, lora=exp.lora, trainer=self._trainer, log=self.log,
                )
                restored = await self._checkpoints.start(resume=self._resume)
                if restored is not None:
                    self._take_over(restored.progress, restored.rng)
            published = await self._sync.ask(Publish(tenant=self.tenant))
        except BaseException:
            # on_stop does not run after a failed start: undo the registration here.
            await asyncio.shield(release_tenant(self.tenant, trainer=self._trainer, sync=self._sync, log=self.log))
            raise
        self._version = published.version
        self.log.info(
            events.TENANT_STARTED, tenant=self.tenant, steps=exp.steps, lr=exp.optim.lr, rank=exp.lora.rank,
            group_size=exp.group_size, prompts_per_step=exp.prompts_per_step, env=env_name(self._env),
            max_staleness=exp.max_staleness,
        )

    async def _sample(self, prompt_token_ids: list[int], spec: SamplingSpec) -> tuple[Completion, int]:
        result: SampleResult = await self._sampler.ask(
            SampleRequest(tenant=self.tenant, prompt_token_ids=prompt_token_ids, sampling=spec)
        )
        self._tokens_sampled += len(result.completions[0].token_ids)
        return result.completions[0], result.adapter_version

    @handler
    async def run(self, msg: RunExperiment) -> ExperimentResult:
        exp = self.experiment
        resumed = self._resumed
        try:
            if resumed is None:
                started = time.time()
                accuracy_start = (await self._evaluate_start()).accuracy
                records: list[StepRecord] = []
                self._commit(0, started, accuracy_start, records)
                await self._checkpoint_after(0)
            else:
                started, accuracy_start = resumed.started_at, resumed.accuracy_start
                records = msgspec.convert(resumed.records, list[StepRecord])
            async with contextlib.aclosing(self._steps(len(records) + 1, exp.steps)) as steps:
                async for step, record in steps:
                    if exp.eval_every and step % exp.eval_every == 0 and step != exp.steps:
                        record = msgspec.structs.replace(record, accuracy=(await self.evaluate(step=step)).accuracy)
                    records.append(record)
                    self._commit(step, started, accuracy_start, records)
                    if self._on_step is not None:
                        self._on_step(self.tenant, record)
                    await self._checkpoint_after(step)
            await self._checkpoint_written()
        except BaseException:
            if self._checkpoints is not None:
                await self._checkpoints.on_stop()
            raise
        score_end = await self.evaluate(step=exp.steps)
        accuracy_end = score_end.accuracy
        if self._adapter_dir is not None:
            await self._trainer.ask(ExportAdapter(tenant=self.tenant, out_dir=str(self._adapter_dir)))
        result = ExperimentResult(
            tenant=self.tenant, steps=records, accuracy_start=accuracy_start, accuracy_end=accuracy_end,
            started_at=started, finished_at=time.time(), tokens_sampled=self._tokens_sampled,
            resumed_from_step=None if resumed is None else resumed.step, held_out=score_end.total,
        )
        low, high = score_end.interval
        self.log.info(
            events.TENANT_FINISHED, tenant=self.tenant, accuracy_start=accuracy_start, accuracy_end=accuracy_end,
            problems=score_end.total, ci_low=round(low, 4), ci_high=round(high, 4),
            steps=len(records), duration_s=round(result.duration_s, 3), adapter_version=self._version,
        )
        return result

    async def evaluate(self, step: int) -> HeldOutScore:
        """Held-out score of the serving version: greedy, one episode per problem, all in flight at once."""
        started = time.perf_counter()
        score = await self._score_serving_version(step)
        self._log_eval(step, score, started, computed_by=self.tenant)
        return score

    async def _evaluate_start(self) -> HeldOutScore:
        """The evaluation before the first step: version 0 is the pristine adapter, i.e. the base model, so
        its score is shared with every tenant of the runtime that evaluates the same held-out set the same way
        (clora.tenant.base_scores); the event names the tenant that computed it."""
        if self._base_scores is None or self._version != 0:
            return await self.evaluate(step=0)
        started = time.perf_counter()
        score, computed_by = await self._base_scores.get(
            base_score_key(self.experiment, self._max_model_len), self.tenant, lambda: self._score_serving_version(0)
        )
        self._log_eval(0, score, started, computed_by=computed_by)
        return score

    async def _score_serving_version(self, step: int) -> HeldOutScore:
        problems = self._env.held_out()
        settings = episode_settings(self.experiment, self._max_model_len, step=step, evaluation=True)
        return await self._retrying(step, "eval", lambda: evaluate(
            self._sample, self._renderer, self._env, problems, settings, step_env=self._env_steps
        ))

    def _log_eval(self, step: int, score: HeldOutScore, started: float, *, computed_by: str) -> None:
        low, high = score.interval
        self.log.info(
            events.TENANT_EVAL, tenant=self.tenant, step=step, adapter_version=self._version,
            accuracy=score.accuracy, correct=score.correct, problems=score.total, ci_low=round(low, 4),
            ci_high=round(high, 4), duration_s=round(time.perf_counter() - started, 3), computed_by=computed_by,
            by_kind={kind: list(count) for kind, count in score.by_kind.items()},
        )

    async def _steps(self, first: int, last: int) -> AsyncIterator[tuple[int, StepRecord]]:
        """The steps ``first`` .. ``last``: one after another (``max_staleness`` = 0, on-policy), or with
        the next steps' rollouts in flight while one trains (clora.tenant.pipeline, docs/async.md)."""
        if self.experiment.max_staleness == 0:
            for step in range(first, last + 1):
                yield step, await self._step(step)
            return
        async with contextlib.aclosing(
            pipelined(first, last, self.experiment.max_staleness, self._start_rollout, self._train)
        ) as steps:
            async for item in steps:
                yield item

    async def _step(self, step: int) -> StepRecord:
        return await self._train(step, await self._start_rollout(step))

    def _start_rollout(self, step: int) -> Awaitable[_Rollout]:
        """Draw step ``step``'s problems now (the RNG's state before is what a checkpoint of step - 1
        keeps), and return its rollout to await."""
        self._rng_before[step] = rng_state(self._rng)
        t0 = time.perf_counter()
        problems = self._env.train_problems(self._rng, self.experiment.prompts_per_step)
        return self._rollout(step, problems, t0)

    async def _rollout(self, step: int, problems: list[Problem], t0: float) -> _Rollout:
        exp = self.experiment
        began = time.time()
        settings = episode_settings(exp, self._max_model_len, step=step)
        groups = await self._retrying(step, "rollout", lambda: sample_groups(
            self._sample, self._renderer, self._env, problems, exp.group_size, settings, step_env=self._env_steps
        ))  # (prompts, group_size)
        return _Rollout(problems=problems, groups=groups, t0=t0, sampled_s=time.perf_counter() - t0,
                        span=(began, time.time()))

    async def _train(self, step: int, rollout: _Rollout) -> StepRecord:
        """Train step ``step`` on its rollout, publish the new version, log ``tenant.step``."""
        exp = self.experiment
        t0, problems, groups = rollout.t0, rollout.problems, rollout.groups
        t_convert = time.perf_counter()
        batch = to_training_data(problems, groups, exp.advantage)
        if not batch.finite:  # finite rewards too large for float32 statistics
            return self._skipped(
                step, "non-finite", batch.reward_mean, time.perf_counter() - t0, time_train_s=0.0,
                error=f"non-finite advantages from rewards {batch.rewards.tolist()}",
            )
        for problem, group in zip(problems, groups, strict=True):
            self.log.debug(
                events.ROLLOUT_GROUP, tenant=self.tenant, step=step, problem=problem.id,
                rewards=[traj.reward for traj in group],
                versions=sorted({v for traj in group for v in traj.versions}),
            )
        data = batch.data
        t_rollout = rollout.sampled_s + time.perf_counter() - t_convert
        reward_mean = batch.reward_mean
        if not data:
            return self._skipped(step, "no-signal", reward_mean, t_rollout, time_train_s=0.0)
        await self._checkpoint_written()  # the last step's store copy is taken before this step changes the store
        t1, train_began = time.perf_counter(), time.time()
        try:
            result: TrainStepResult = await self._trainer.ask(TrainStep(
                tenant=self.tenant, data=data, loss=exp.resolved_loss, copy_adapter=True,
                copy_state=self._checkpoints is not None and self._checkpoints.enabled,
                max_staleness=exp.max_staleness, stale_policy=exp.stale_policy,
            ))
        except NonFiniteError as e:  # the trainer rejected the step and left the adapter as it was
            return self._skipped(
                step, "non-finite", reward_mean, t_rollout, time_train_s=time.perf_counter() - t1, error=str(e)
            )
        except StaleDataError as e:  # past the bound on the trainer's version: nothing trained
            # the trainer's version is ahead of what serves: serve it, so the next samples are fresh
            self._version = (await self._retrying(step, "publish", lambda: self._sync.ask(
                Publish(tenant=self.tenant, keep_serving=exp.max_staleness > 0)
            ))).version
            if exp.stale_policy == "resample" and not rollout.resampled:
                self.log.warning(events.TENANT_RESAMPLED, tenant=self.tenant, step=step, stale=len(e.stale),
                                 adapter_version=self._version, error=str(e))
                again = await self._rollout(step, list(problems), time.perf_counter())
                return await self._train(step, dataclasses.replace(again, resampled=True))
            return self._skipped(
                step, "stale", reward_mean, t_rollout, time_train_s=time.perf_counter() - t1, error=str(e)
            )
        t2, train_ended = time.perf_counter(), time.time()
        self._step_state = result.state  # the checkpoint's store copy of this step, when asked for
        published = await self._retrying(step, "publish", lambda: self._sync.ask(
            Publish(tenant=self.tenant, adapter=result.adapter, keep_serving=exp.max_staleness > 0)
        ))
        t3 = time.perf_counter()
        self._version = published.version
        fields = {f"train/{k}": v for k, v in result.metrics.values.items()}
        fields.update({
            "reward/mean": reward_mean,
            "time/rollout": round(t_rollout, 3),
            "time/train": round(t2 - t1, 3),
            "time/sync": round(t3 - t2, 3),
            "train/sequences": len(data),
            "staleness": {str(age): n for age, n in sorted(result.staleness.items())},
            "stale_dropped": result.dropped,
        })
        self.log.info(
            events.TENANT_STEP, tenant=self.tenant, step=step, adapter_version=self._version,
            duration_s=round(t3 - t0, 3), queue_depth=self._trainer.stats.depth, **fields,
        )
        return StepRecord(
            step=step, adapter_version=self._version, reward_mean=reward_mean, time_rollout_s=t_rollout,
            time_train_s=t2 - t1, time_sync_s=t3 - t2, trained=True, rollout_at=rollout.span,
            train_at=(train_began, train_ended),
        )

    def _skipped(
        self, step: int, reason: str, reward_mean: float, t_rollout: float, *, time_train_s: float,
        error: str | None = None,
    ) -> StepRecord:
        """Log and record a step that trained nothing: the adapter and its version stay as they were."""
        fields = {
            "tenant": self.tenant, "step": step, "adapter_version": self._version, "reason": reason,
            "duration_s": round(t_rollout + time_train_s, 3), "reward/mean": reward_mean,
            "time/rollout": round(t_rollout, 3),
        }
        if error is None:
            self.log.info(events.TENANT_STEP_SKIPPED, **fields)
        else:
            self.log.warning(events.TENANT_STEP_SKIPPED, error=error, **fields)
        return StepRecord(
            step=step, adapter_version=self._version, reward_mean=reward_mean, time_rollout_s=t_rollout,
            time_train_s=time_train_s, time_sync_s=0.0, trained=False,
        )

    async def _retrying(self, step: int, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, tried again up to ``retries`` times after an env or publish error, with
        doubling backoff; the last error is raised. A rollout retry reuses the step's problems."""
        exp = self.experiment
        for tries in itertools.count(1):
            try:
                return await attempt()
            except (EnvError, PublishError) as e:
                if tries > exp.retries:
                    raise
                backoff = exp.retry_backoff_s * 2 ** (tries - 1)
                self.log.warning(
                    events.TENANT_RETRY, tenant=self.tenant, step=step, what=what, attempt=tries,
                    retries=exp.retries, backoff_s=backoff, error=f"{type(e).__name__}: {e}",
                )
                await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ checkpoints

    def _commit(self, step: int, started: float, accuracy_start: float, records: list[StepRecord]) -> None:
        """Step ``step`` is complete: what a checkpoint of it holds. Its RNG state is the one before
        step + 1's draw (with rollouts in flight, later steps drew already; a resume draws them again)."""
        state, self._step_state = self._step_state, None
        rng = self._rng_before.pop(step + 1, None)
        rng = rng_state(self._rng) if rng is None else rng
        for drawn in [s for s in self._rng_before if s <= step]:
            del self._rng_before[drawn]
        if self._checkpoints is not None:
            self._checkpoints.commit(TenantProgress(
                step=step, rng=rng, accuracy_start=accuracy_start, started_at=started,
                tokens_sampled=self._tokens_sampled, records=msgspec.to_builtins(records),
            ), self._version, state=state)

    async def _checkpoint_after(self, step: int) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.after_step(step)

    async def _checkpoint_written(self) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.before_train()

    def _take_over(self, progress: TenantProgress, rng: random.Random) -> None:
        """Continue from a restored checkpoint's progress."""
        try:
            msgspec.convert(progress.records, list[StepRecord])
        except msgspec.ValidationError as e:
            raise CheckpointError(f"checkpoint of tenant {self.tenant!r}: step records are invalid: {e}") from None
        self._rng = rng
        self._tokens_sampled = progress.tokens_sampled
        self._resumed = progress

    async def on_stop(self) -> None:
        self._env_steps.close()
        await release_tenant(self.tenant, trainer=self._trainer, sync=self._sync, log=self.log)

    async def on_failure(self, exc: BaseException) -> None:
        self._env_steps.close()
        await release_tenant(self.tenant, trainer=self._trainer, sync=self._sync, log=self.log)


def env_name(env: Env) -> str:
    """What an env calls itself (``Env.name``; its class name when it has none)."""
    name = getattr(env, "name", None)
    return name if isinstance(name, str) and name else type(env).__name__


async def release_tenant(tenant: str, *, trainer: ActorRef, sync: ActorRef, log: Any) -> None:
    """Unload a tenant from the engine and drop its trainer state. Each part is attempted even if
    the other fails; failures are logged (the tenant is going away either way)."""
    for ref, msg in ((sync, RemoveAdapter(tenant=tenant)), (trainer, RemoveTenant(tenant=tenant))):
        try:
            await ref.ask(msg)
        except Exception as e:  # already gone, or that actor stopped: nothing left to release there
            log.info(events.TENANT_RELEASE_INCOMPLETE, tenant=tenant, step=type(msg).__name__, error=str(e))

