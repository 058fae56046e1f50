"""The public facade: ``async with clora.Runtime(config) as rt``.

A runtime owns one warm base model: the sampler (vLLM engine), the trainer (device) and the
sync actor, under one actor system. Experiments run as TenantActors that come and go while
the others run; scripted tenants get a ``TenantHandle`` with Tinker-style primitives.

Crash safety: an experiment with ``checkpoint_every`` > 0 checkpoints into
``<run_dir>/tenants/<name>/checkpoint/`` (see clora.checkpoint.format). ``Runtime(config, resume=True)``
continues every experiment that has a checkpoint there from its last checkpointed step (same
adapter, optimizer state, RNG and data position); without ``resume`` an experiment starts fresh
and its old checkpoint is deleted. Resuming is explicit so that re-running a config into a used
run folder never continues an unrelated run by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import msgspec

from actors import ActorRef, ActorSystem, Supervision, UnknownMessage
from clora import events
from clora.rl.chat import ChatRenderer
from clora.checkpoint.format import BaseModelIdentity, base_model_identity
from clora.cluster.pool import start_local_pool
from clora.continual.learner import LearnerPolicy
from clora.continual.tenant import Continual
from clora.config import ExperimentConfig, LoraConfig, OptimConfig, RuntimeConfig, validate_tenant_name
from clora.envs import Env, make_env
from clora.errors import AdapterMismatchError, ConfigError, DuplicateTenantError, UnknownTenantError
from clora.messages import AddTenant, ExportAdapter, GetEngineStats, Publish
from clora.models import resolve_model
from clora.precision import engine_dtype
from clora.preflight import check_experiment, check_run
from clora.sampler.actor import SamplerActor
from clora.sampler.engine import Engine
from clora.sampler.engine_stats import EngineStatsSnapshot
from clora.sampler.engine_weights import engine_model_dir
from clora.sampler.sync import SyncActor
from clora.sched import Scheduler, TenantPolicy
from clora.tenant.base_scores import BaseScores
from clora.tenant.actor import ExperimentResult, RunExperiment, StepRecord, TenantActor, release_tenant
from clora.tenant.handle import TenantHandle
from clora.trainer.actor import TrainerActor

__all__ = ["Runtime", "TenantHandle"]


class Runtime:
    """Sampler, trainer and sync actors on one base model, and the tenants using them."""

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        run_dir: str | Path | None = None,
        console_level: str = "warning",
        resume: bool = False,
        engine: Engine | Sequence[Engine] | None = None,
    ) -> None:
        """``console_level``: events below it reach only the run folder, not your structlog output (by
        default only warnings and errors do: a library is quiet; every event is in events.jsonl).
        ``resume``: experiments continue from their checkpoints in ``run_dir`` (see the module doc).
        ``engine``: a running engine to borrow instead of starting one (the runtime neither starts nor
        shuts it down): one engine shared by several runtimes, or ``clora.testing.FakeEngine``. A list of
        several: one sampler per engine, with a ``SamplerPool`` in front (docs/sampler-pool.md)."""
        self.config = config or RuntimeConfig()
        self.console_level = console_level
        self.resume = resume
        self._engines: list[Engine] | None = None  # several: one sampler replica each, behind a pool
        if isinstance(engine, Sequence):
            if not engine:
                raise ConfigError("engine: give an engine, a list of engines (a sampler pool), or None")
            self._engines = list(engine) if len(engine) > 1 else None
            engine = engine[0] if len(engine) == 1 else None
        self._engine = engine
        self.run_dir = Path(run_dir if run_dir is not None else self.config.run_dir)
        self._stack = contextlib.AsyncExitStack()
        self._tenants: set[str] = set()
        self._opened: dict[str, float] = {}  # scripted tenants still open: when they opened (perf_counter)
        self._handles: dict[str, TenantHandle] = {}  # their handles
        self._system: ActorSystem | None = None
        self.sampler: ActorRef | None = None
        self.trainer: ActorRef | None = None
        self.sync: ActorRef | None = None
        self.model_dir: Path | None = None
        self.renderer: ChatRenderer | None = None
        self.tokenizer: Any = None
        self.base_model: BaseModelIdentity | None = None
        self.scheduler: Scheduler | None = None  # one policy for the engine's admission and the trainer's queue
        self._base_scores = BaseScores()  # the base model's held-out scores, shared by the tenants' first evals

    async def __aenter__(self) -> "Runtime":
        started = time.time()
        cfg = self.config
        # "auto" precision resolved once for the engine (the trainer resolves its own for its device)
        model_cfg = msgspec.structs.replace(cfg.model, dtype=engine_dtype(cfg.model.dtype))
        # Bad input fails here, before the run folder or the engine exist (clora.preflight).
        self.model_dir = await asyncio.to_thread(resolve_model, cfg.model)
        await asyncio.to_thread(check_run, cfg, self.model_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sink = events.JsonlSink(self.run_dir / "events.jsonl")
        self._stack.callback(sink.close)
        try:
            cluster_info = None
            if cfg.cluster is not None:  # joined before the actors start, left after they stopped
                from clora.cluster.placement import connect_cluster

                close_cluster, cluster_info = await connect_cluster(cfg.cluster)
                self._stack.callback(close_cluster)
            self.base_model = await asyncio.to_thread(base_model_identity, self.model_dir)
            self.tokenizer = await asyncio.to_thread(_load_tokenizer, self.model_dir)
            self.renderer = ChatRenderer(self.tokenizer)
            self._system = await self._stack.enter_async_context(
                ActorSystem("clora", logger=events.run_logger(sink, self.console_level))
            )
            # vLLM's own logging: errors only, unless VLLM_LOGGING_LEVEL says otherwise (a library is quiet).
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            borrowed = self._engine is not None or self._engines is not None or cfg.cluster is not None
            engine_dir = self.model_dir if borrowed else await asyncio.to_thread(
                engine_model_dir, self.model_dir, model_cfg.dtype)  # a bf16 engine loads bf16 weights
            if cfg.cluster is not None:  # sampler(s) and trainer in Ray actors (docs/scale-out.md)
                from clora.cluster.placement import start_remote_actors

                if self._engines is not None:
                    raise ConfigError("Runtime(engine=[...]): a list of engines is a local pool; with a cluster, "
                                      "set cluster.sampler_replicas (each replica starts its own engine)")
                self._system.log.info(events.CLUSTER_CONNECTED, address=cluster_info["address"],
                                      nodes=cluster_info["nodes"], cpus=cluster_info["cpus"],
                                      gpus=cluster_info["gpus"], started_here=cluster_info["started_here"])
                remote = await start_remote_actors(cfg, self._system, engine=self._engine)
                self.sampler, self.trainer, self.scheduler = remote.sampler, remote.trainer, remote.scheduler
            else:
                self.scheduler = Scheduler(aging_s=cfg.scheduler.aging_s, wait_bound_s=cfg.scheduler.wait_bound_s,
                                           yield_to_higher=cfg.scheduler.yield_to_higher,
                                           linger_s=cfg.scheduler.linger_s, log=self._system.log)

                def sampler(engine: Engine | None) -> SamplerActor:
                    return SamplerActor(engine_dir, model_cfg, cfg.engine, shared_engine=engine,
                                        scheduler=self.scheduler, max_resident=cfg.scheduler.max_resident_adapters)

                if self._engines is None:
                    self.sampler = await self._system.start(sampler(self._engine), name="sampler",
                                                            supervision=Supervision.ESCALATE)
                else:
                    self.sampler = await start_local_pool(self._system, [sampler(e) for e in self._engines])
                self.trainer = await TrainerActor.start_in(self._system, self.model_dir, cfg.trainer,
                                                           scheduler=self.scheduler)
            self.sync = await self._system.start(
                SyncActor(self.trainer, self.sampler), name="sync", supervision=Supervision.ESCALATE
            )
        except BaseException:
            await self._stack.aclose()
            raise
        self._started = started
        self._system.log.info(
            events.RUNTIME_STARTED, model=str(self.model_dir), dtype=model_cfg.dtype, run_dir=str(self.run_dir),
            max_loras=cfg.engine.max_loras, resume=self.resume, duration_s=round(time.time() - started, 3),
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._system is not None:
            for name in list(self._opened):  # scripted tenants leave their adapter like experiments
                try:
                    await self.close_tenant(name)
                except Exception as e:  # the runtime is going down anyway; the log says what was lost
                    self._system.log.warning(events.TENANT_RELEASE_INCOMPLETE, tenant=name, step="close",
                                             error=f"{type(e).__name__}: {e}")
            self._system.log.info(events.RUNTIME_STOPPED, duration_s=round(time.time() - self._started, 3))
        return await self._stack.__aexit__(*exc_info)

    @property
    def log(self) -> Any:
        """The runtime's structlog logger, for code beside the runtime (``clora serve``): its events go to
        ``<run_dir>/events.jsonl`` with the runtime's own. Only while the runtime is started."""
        if self._system is None:
            raise RuntimeError("Runtime.log: the runtime is not started (use it inside `async with`)")
        return self._system.log

    async def engine_stats(self) -> EngineStatsSnapshot | None:
        """What the vLLM engine computed, served from its prefix cache and batched since the runtime
        started (take two and ``newer.minus(older)`` for a stretch of time); None without stats."""
        return await self.ask(GetEngineStats())

    # ------------------------------------------------------------------ experiments

    async def run(
        self,
        experiment: ExperimentConfig,
        *,
        env: Env | None = None,
        on_step: Callable[[str, StepRecord], None] | None = None,
    ) -> ExperimentResult:
        """Run one experiment as a TenantActor on the warm runtime; other tenants keep running.

        ``env`` overrides the built-in environment named by ``experiment.env``. With ``resume``,
        an experiment that has a checkpoint continues from it (``result.resumed_from_step``).
        """
        check_experiment(experiment, self.config, model_dir=self.model_dir, env=env is None)
        self._claim(experiment.name, experiment.lora)
        self.scheduler.set_policy(experiment.name, experiment.priority, experiment.weight)
        ref = None
        try:
            actor = TenantActor(
                experiment,
                env=env if env is not None else make_env(experiment.env),
                renderer=self.renderer,
                sampler=self.sampler,
                trainer=self.trainer,
                sync=self.sync,
                max_model_len=self.config.model.max_model_len,
                adapter_dir=self.adapter_dir(experiment.name),
                on_step=on_step,
                checkpoint_dir=self.checkpoint_dir(experiment.name),
                base_model=self.base_model,
                resume=self.resume,
                base_scores=self._base_scores if env is None else None,  # a user's env object: its own held-out set
            )
            ref = await self._system.start(actor, name=f"tenant:{experiment.name}", supervision=Supervision.ISOLATE)
            return await ref.ask(RunExperiment())
        except BaseException as e:
            self._system.log.warning(events.TENANT_FAILED, tenant=experiment.name, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if ref is not None:
                try:
                    await self._system.stop(ref, mode="abort")
                except Exception as e:  # the experiment's own outcome matters more; keep this in the log
                    self._system.log.warning(events.TENANT_RELEASE_INCOMPLETE, tenant=experiment.name, error=str(e))
            self._tenants.discard(experiment.name)
            self.scheduler.remove(experiment.name)

    def checkpoint_dir(self, name: str) -> Path:
        """Where tenant ``name``'s checkpoint lives in this runtime's run folder."""
        return self.run_dir / "tenants" / validate_tenant_name(name) / "checkpoint"

    async def run_many(
        self,
        experiments: Sequence[ExperimentConfig],
        *,
        envs: Mapping[str, Env] | None = None,
        on_step: Callable[[str, StepRecord], None] | None = None,
    ) -> dict[str, ExperimentResult | BaseException]:
        """Run experiments concurrently. One tenant's failure is its own result; the others go on.

        ``envs``: your own environment for some experiments, by name (the others use ``experiment.env``)."""
        names = [e.name for e in experiments]
        if len(set(names)) != len(names):
            raise DuplicateTenantError(f"duplicate tenant names in {names}")
        envs = dict(envs or {})
        unknown = sorted(set(envs) - set(names))
        if unknown:
            raise ConfigError(f"envs names {', '.join(map(repr, unknown))}, which is not an experiment here "
                              f"(experiments: {', '.join(names)})")
        outcomes = await asyncio.gather(
            *(self.run(e, env=envs.get(e.name), on_step=on_step) for e in experiments), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise outcome
        return dict(zip(names, outcomes))

    async def tenant(
        self, name: str, *, lora: LoraConfig | None = None, optim: OptimConfig | None = None,
        priority: int = 0, weight: float = 1.0, continual: LearnerPolicy | bool | None = None,
    ) -> TenantHandle:
        """A scripted tenant: its adapter is registered with the trainer and serving as version 0.
        ``priority`` / ``weight``: its scheduling class and share (as ExperimentConfig's; docs/scheduling.md).
        ``continual`` (True or a LearnerPolicy): keep named versions, aliases and feedback in
        ``<run_dir>/tenants/<name>/continual`` and learn from feedback (docs/continual.md); with
        ``resume`` it continues from its newest kept version.

        ``close()`` (or the runtime's exit) writes its adapter to ``<run_dir>/tenants/<name>/adapter``,
        where ``clora export`` finds it, and frees the name."""
        lora = lora or LoraConfig()
        optim = optim or OptimConfig()
        policy = TenantPolicy(priority, weight)  # a bad weight fails before anything is claimed
        self._claim(name, lora)
        self.scheduler.set_policy(name, policy.priority, policy.weight)
        try:
            await self.trainer.ask(AddTenant(tenant=name, lora=lora, optim=optim))
        except BaseException:
            self._tenants.discard(name)
            self.scheduler.remove(name)
            raise
        try:
            published = await self.sync.ask(Publish(tenant=name))
        except BaseException:
            await asyncio.shield(self.release(name))
            raise
        handle = TenantHandle(self, name, published.version)
        if continual:
            policy = continual if isinstance(continual, LearnerPolicy) else LearnerPolicy()
            try:
                handle._continual = await Continual.open(handle, policy, self.continual_dir(name), resume=self.resume)
            except BaseException:
                await asyncio.shield(self.release(name))
                raise
        self._opened[name] = time.perf_counter()
        self._handles[name] = handle
        self._system.log.info(events.TENANT_OPENED, tenant=name, rank=lora.rank, lr=optim.lr,
                              adapter_version=handle.version, continual=bool(continual))
        return handle

    def continual_dir(self, name: str) -> Path:
        """Where continual tenant ``name`` keeps its versions, aliases and feedback (docs/continual.md)."""
        return self.run_dir / "tenants" / validate_tenant_name(name) / "continual"

    def adapter_dir(self, name: str) -> Path:
        """Where tenant ``name``'s final adapter is written (PEFT format; ``clora export`` reads it)."""
        return self.run_dir / "tenants" / validate_tenant_name(name) / "adapter"

    async def ask(self, message: Any) -> Any:
        """Send an actor message to the runtime actor whose declared inbox holds its type (sampler,
        trainer or sync) and return the reply."""
        for ref in (self.sampler, self.trainer, self.sync):
            if ref is not None and ref.accepts(type(message)):
                return await ref.ask(message)
        raise UnknownMessage("runtime", type(message), ())

    def _claim(self, name: str, lora: LoraConfig) -> None:
        validate_tenant_name(name)
        if lora.rank > self.config.engine.max_lora_rank:
            raise AdapterMismatchError(
                f"lora.rank {lora.rank} of tenant {name!r} exceeds engine.max_lora_rank {self.config.engine.max_lora_rank}"
            )
        if name in self._tenants:
            raise DuplicateTenantError(f"tenant {name!r} already exists in this runtime")
        self._tenants.add(name)

    async def close_tenant(self, name: str) -> None:
        """The end of scripted tenant ``name`` (``TenantHandle.close``): its adapter is written to
        ``adapter_dir(name)``, ``tenant.closed`` logged, and the tenant released. Twice does nothing."""
        opened = self._opened.pop(name, None)
        if opened is None:
            return
        handle = self._handles.pop(name, None)
        try:
            if handle is not None and handle._continual is not None:
                await handle._continual.close()
            adapter = self.adapter_dir(name)
            version = await self.trainer.ask(ExportAdapter(tenant=name, out_dir=str(adapter)))
            self._system.log.info(events.TENANT_CLOSED, tenant=name, adapter_version=version, adapter=str(adapter),
                                  duration_s=round(time.perf_counter() - opened, 3))
        finally:
            await self.release(name)

    async def release(self, name: str) -> None:
        """Unload tenant ``name`` from the engine and drop its trainer state; the name is free again."""
        try:
            await release_tenant(name, trainer=self.trainer, sync=self.sync, log=self._system.log)
        finally:
            self._tenants.discard(name)
            self.scheduler.remove(name)

    def set_priority(self, name: str, priority: int | None = None, weight: float | None = None) -> TenantPolicy:
        """Change tenant ``name``'s scheduling class and / or weight (None keeps one) while it runs: the next
        decision of the engine's admission and the trainer's step queue uses them (a ``scheduler.policy_changed``
        event). Returns the policy now in force; UnknownTenantError for a tenant not running here."""
        if name not in self._tenants:
            raise UnknownTenantError(f"tenant {name!r} is not running in this runtime (running: "
                                     f"{', '.join(sorted(self._tenants)) or 'none'})")
        if weight is not None:
            TenantPolicy(weight=weight)  # ValueError naming the bad weight, before anything changes
        return self.scheduler.set_policy(name, priority, weight)


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
