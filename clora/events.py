"""Event names of the runtime layer and the JSON-lines sink of a run folder.

The library never configures structlog. A ``Runtime`` builds its actors' loggers with
``run_logger``: the caller's structlog configuration, with one processor in front that also
writes every event as one JSON line to ``<run_dir>/events.jsonl``. ``read_events`` reads
such a file back.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Final, Iterator

import msgspec
import structlog

# The actor kernel's events: defined in actors/ (which imports nothing from clora), listed here too.
from actors.events import (
    ACTOR_STARTED,
    ACTOR_START_FAILED,
    ACTOR_STOPPED,
    ACTOR_FAILED,
    ACTOR_RESTARTED,
    ACTOR_HOOK_FAILED,
    ACTOR_MAILBOX_STATS,
    SYSTEM_STARTED,
    SYSTEM_STOPPED,
)

__all__ = [
    "ACTOR_STARTED",
    "ACTOR_START_FAILED",
    "ACTOR_STOPPED",
    "ACTOR_FAILED",
    "ACTOR_RESTARTED",
    "ACTOR_HOOK_FAILED",
    "ACTOR_MAILBOX_STATS",
    "SYSTEM_STARTED",
    "SYSTEM_STOPPED",
    "RUNTIME_STARTED",
    "RUNTIME_STOPPED",
    "TENANT_STARTED",
    "TENANT_OPENED",
    "TENANT_CLOSED",
    "TENANT_STEP",
    "TENANT_EVAL",
    "TENANT_FINISHED",
    "TENANT_FAILED",
    "TENANT_STEP_SKIPPED",
    "TENANT_RETRY",
    "TENANT_RESAMPLED",
    "TENANT_RELEASE_INCOMPLETE",
    "ROLLOUT_GROUP",
    "ADAPTER_PUBLISHED",
    "PUBLISH_FAILED",
    "CHECKPOINT_WRITTEN",
    "CHECKPOINT_RESUMED",
    "CHECKPOINT_FAILED",
    "TRAINER_STARTED",
    "TRAINER_STEP",
    "TRAINER_FORWARD_BACKWARD",
    "TRAINER_STEP_REJECTED",
    "TRAINER_STALE_DATA",
    "TRAINER_TENANT_ADDED",
    "TRAINER_TENANT_REMOVED",
    "TRAINER_EXPORTED",
    "TRAINER_IMPORTED",
    "TRAINER_STATE_RESTORED",
    "ENGINE_STARTED",
    "ENGINE_STOPPED",
    "ENGINE_DIED",
    "ENGINE_STATS",
    "ENGINE_TOTALS",
    "ADAPTER_REGISTERED",
    "ADAPTER_LOADED",
    "ADAPTER_REMOVED",
    "ADAPTER_LOADED_BESIDE",
    "ADAPTER_RETIRED",
    "SAMPLE_DONE",
    "REPLICA_PLACED",
    "REPLICA_FAILED",
    "FAILOVER",
    "REQUEST_RETRIED",
    "SCHEDULER_DECISION",
    "SCHEDULER_WAIT_EXCEEDED",
    "SCHEDULER_POLICY_CHANGED",
    "SCHEDULER_PAGE_IN",
    "SCHEDULER_PAGE_OUT",
    "SCHEDULER_YIELDED",
    "SCHEDULER_RESUMED",
    "EPISODE_CONTEXT_FULL",
    "SERVE_STARTED",
    "SERVE_STOPPED",
    "SERVE_REQUEST_FAILED",
    "SERVE_TENANT_CREATED",
    "SERVE_FUTURES_DROPPED",
    "SERVE_FUTURES_CANCELLED",
    "CONTINUAL_VERSION_COMMITTED",
    "CONTINUAL_PROMOTED",
    "CONTINUAL_PROMOTION_REFUSED",
    "CONTINUAL_ROLLED_BACK",
    "CONTINUAL_FEEDBACK",
    "CONTINUAL_LEARNER_STEP",
    "CONTINUAL_LEARNER_SKIPPED",
    "CONTINUAL_LEARNER_FAILED",
    "CONTINUAL_RESUMED",
    "CONTINUAL_SAMPLES_COMPACTED",
    "CONTINUAL_CHECKED_OUT",
    "BENCH_MODE_DONE",
    "CLUSTER_CONNECTED",
    "CLUSTER_HOST_STARTED",
    "CLUSTER_HOST_STOPPED",
    "CLUSTER_HOST_DIED",
    "CLUSTER_CALL_CANCELLED",
    "CLUSTER_ADAPTER_SHIPPED",
    "CLUSTER_ADAPTER_RECEIVED",
    "JsonlSink",
    "DropBelow",
    "run_logger",
    "read_events",
]

RUNTIME_STARTED: Final = "runtime.started"
"""The runtime's actors are up: base ``model``, ``dtype``, ``max_loras``, ``run_dir``, ``resume``, ``duration_s``."""
RUNTIME_STOPPED: Final = "runtime.stopped"
"""The runtime stopped; ``duration_s`` since start."""
TENANT_STARTED: Final = "tenant.started"
"""A tenant's experiment began: its config in brief (``steps``, ``lr``, ``rank``, ``group_size``,
``prompts_per_step``, ``env``, ``max_staleness``)."""
TENANT_OPENED: Final = "tenant.opened"
"""A scripted tenant (rt.tenant) is registered and serving: ``rank``, ``lr``, ``adapter_version``."""
TENANT_CLOSED: Final = "tenant.closed"
"""A scripted tenant was closed (by its handle's close() or the runtime's exit): the trainer's
``adapter_version`` written to the ``adapter`` folder, ``duration_s`` since it opened."""
TENANT_STEP: Final = "tenant.step"
"""The canonical line of one RL step: ``step``, ``adapter_version``, ``duration_s``, ``queue_depth``,
``reward/mean``, ``time/rollout``, ``time/train``, ``time/sync``, ``train/sequences`` and the trainer's values as
``train/*`` (``train/ratio_mean``: the mean importance ratio); ``staleness``: the histogram u - v -> data trained (v: the
version that sampled a datum, u: the version it trained on; docs/async.md), ``stale_dropped``: data the trainer
dropped."""
TENANT_EVAL: Final = "tenant.eval"
"""Held-out ``accuracy`` of a tenant at a ``step``: ``correct`` of ``problems`` (greedy, one sample per problem,
all in flight at once), its 95% Wilson interval ``ci_low`` .. ``ci_high``, ``by_kind`` (kind -> [correct, problems] for
envs whose problems name their kind, e.g. the arithmetic env's operation), ``duration_s``, and ``computed_by``:
the tenant itself, or (the evaluation before step 1, of the base model) the tenant of the same runtime that
computed the same held-out score first (clora.tenant.base_scores)."""
TENANT_FINISHED: Final = "tenant.finished"
"""A tenant's experiment completed: ``accuracy_start``, ``accuracy_end`` on ``problems`` held-out problems
with its 95% Wilson interval ``ci_low`` .. ``ci_high``, ``steps``, ``duration_s``."""
TENANT_FAILED: Final = "tenant.failed"
"""A tenant's experiment ended with an ``error``; the others go on."""
TENANT_STEP_SKIPPED: Final = "tenant.step_skipped"
"""A step trained nothing (``reason``: no-signal = all advantages zero; non-finite = the trainer rejected
it, with the ``error``; stale = every datum was past max_staleness): the adapter and its version stay as they were."""
TENANT_RETRY: Final = "tenant.retry"
"""A rollout (env error, bad reward, env step timeout) or a publish failed and is tried again after
``backoff_s`` (``what``: rollout / eval / publish; ``attempt``: the try that failed; ``error``)."""
TENANT_RESAMPLED: Final = "tenant.resampled"
"""The trainer found ``stale`` of a step's data past its max_staleness (``error``); the tenant, with
stale_policy "resample", published the trainer's version (``adapter_version``) and samples the step's problems
again with it."""
TENANT_RELEASE_INCOMPLETE: Final = "tenant.release_incomplete"
"""Part of removing a tenant (engine adapter or trainer state: ``step``) failed or was already gone (``error``)."""
ROLLOUT_GROUP: Final = "tenant.rollout_group"
"""One group of G episodes of one ``problem`` finished: ``rewards`` and the adapter ``versions`` that sampled it."""
ADAPTER_PUBLISHED: Final = "sync.published"
"""A tenant's new ``adapter_version`` serves in the engine: ``duration_s``, ``size_bytes``."""
PUBLISH_FAILED: Final = "sync.publish_failed"
"""Publishing ``version`` failed (``error``); ``serving_version`` keeps serving."""
CHECKPOINT_WRITTEN: Final = "tenant.checkpointed"
"""A tenant's checkpoint was committed (store, RNG, progress): ``step``, ``adapter_version``, ``duration_s``,
``bytes``, ``path``."""
CHECKPOINT_RESUMED: Final = "tenant.resumed"
"""A tenant continues from its checkpoint: ``step`` (last completed), ``adapter_version``, ``from_path``, ``digest``."""
CHECKPOINT_FAILED: Final = "tenant.checkpoint_failed"
"""Writing the checkpoint on stop failed; the previous checkpoint stays (``error`` says why)."""
TRAINER_STARTED: Final = "trainer.started"
"""The base model is loaded: ``model_dir``, ``device``, ``autocast_bf16``, ``micro_batch_size``, ``shared_prefix``
(``prefix_off_reason``: why it is off, or None), ``load_s``; the worker thread's ``cpus`` and ``nice`` value and
torch's intra-op ``threads`` (TrainerConfig.cpus / nice / num_threads)."""
TRAINER_STEP: Final = "trainer.step"
"""Canonical line of one optimizer step (TrainStep or OptimStep): ``tenant``, ``step``, ``version``, ``duration_s``,
``queue_depth``, ``wait_s`` (TrainStep: time queued) and the StepMetrics values (loss, grad_norm, lr, clip_frac,
kl_sampler, kl when the loss has a KL penalty, ratio_mean, entropy, tokens, tokens_computed, tokens_lm_head, fused,
time/*); ``staleness``: u - v -> data trained (u = version - 1; each datum's tag; empty for untagged data) and
``stale_dropped`` (data past the bound, not trained)."""
TRAINER_FORWARD_BACKWARD: Final = "trainer.forward_backward"
"""One ForwardBackward accumulated gradients: ``tenant``, ``version``, ``duration_s``, ``queue_depth`` and the
StepMetrics values (loss, tokens, ...)."""
TRAINER_STALE_DATA: Final = "trainer.stale_data"
"""A TrainStep held data past its ``max_staleness`` on ``version`` (docs/async.md): ``stale`` of ``of`` data
(``sampler_versions``), ``policy``; ``trained``: the fresh rest trained (drop), else the step was rejected
(``error``)."""
TRAINER_STEP_REJECTED: Final = "trainer.step_rejected"
"""A step of one tenant was rejected (non-finite loss or gradient: ``error``); its store is unchanged."""
TRAINER_TENANT_ADDED: Final = "trainer.tenant_added"
"""A tenant's AdapterStore exists at version 0: ``rank``, ``alpha``, ``targets``, ``params``, ``init_from``."""
TRAINER_TENANT_REMOVED: Final = "trainer.tenant_removed"
"""A tenant's AdapterStore was dropped: its last ``version``."""
TRAINER_EXPORTED: Final = "trainer.exported"
"""A tenant's adapter was written as a PEFT directory: ``version``, ``out_dir``, ``duration_s``."""
TRAINER_IMPORTED: Final = "trainer.imported"
"""A tenant's weights were replaced from a PEFT directory (optimizer reset): ``version``, ``path``."""
TRAINER_STATE_RESTORED: Final = "trainer.state_restored"
"""A tenant's whole store (weights, Adam moments, counters) was replaced by a checkpoint's: ``version``,
``adam_step``."""

ENGINE_STARTED: Final = "sampler.engine_started"
"""The vLLM engine is up: ``model``, ``dtype``, ``max_loras``, ``max_lora_rank``, ``duration_s``."""
ENGINE_STOPPED: Final = "sampler.engine_stopped"
"""The sampler shut its engine down cleanly."""
ENGINE_DIED: Final = "sampler.engine_died"
"""The vLLM engine process died (``error``); the sampler crashes (fatal for the runtime)."""
ENGINE_STATS: Final = "sampler.engine_stats"
"""What the vLLM engine did in the ``window_s`` seconds since the previous such line, as the fields of
EngineStatsSnapshot: prompt_tokens, prompt_tokens_computed, prompt_tokens_cached (served from the prefix cache),
cached_fraction, generation_tokens, steps, busy_s, decode_batch_mean / decode_batch_max, decode_batches (steps per
decode batch size), waiting_max. Logged as requests finish, at most once per interval."""
ENGINE_TOTALS: Final = "sampler.engine_totals"
"""The same counters as sampler.engine_stats over the sampler's whole life, logged when it stops (clora events
prints them)."""
ADAPTER_REGISTERED: Final = "sampler.adapter_registered"
"""A tenant's adapter serves for the first time: ``tenant``, ``version``, ``lora_id``, ``duration_s``."""
ADAPTER_LOADED: Final = "sampler.adapter_loaded"
"""A tenant's adapter was replaced in place: ``tenant``, ``version``, ``duration_s``, ``gate_wait_s``."""
ADAPTER_REMOVED: Final = "sampler.adapter_removed"
"""A tenant's adapter (``lora_id``) was unloaded from the engine."""
ADAPTER_LOADED_BESIDE: Final = "sampler.adapter_loaded_beside"
"""A tenant's new ``version`` serves under a new ``lora_id`` (LoadAdapter.keep_serving, no gate) while its
``previous_version`` finishes ``previous_in_flight`` requests: ``duration_s``."""
ADAPTER_RETIRED: Final = "sampler.adapter_retired"
"""An old ``version`` of a tenant's adapter (``lora_id``) finished its last request beside a newer one and was
unloaded from the engine."""
SAMPLE_DONE: Final = "sampler.sample_done"
"""One SampleRequest finished: ``tenant``, ``adapter_version``, ``n``, ``prompt_tokens``, ``completion_tokens``,
``duration_s``."""
REPLICA_PLACED: Final = "sampler.replica_placed"
"""A sampler pool registered a ``tenant``'s adapter ``version`` on a ``replica`` (``replicas``: all of the tenant's;
``tenants``: how many that replica serves now; docs/sampler-pool.md)."""
REPLICA_FAILED: Final = "sampler.replica_failed"
"""A sampler pool's ``replica`` died (``error``); its ``tenants`` fail over to the ``alive`` replicas (none left:
the pool fails as a single sampler does)."""
FAILOVER: Final = "sampler.failover"
"""A ``tenant`` left ``from_replica`` (it died, or could not go back to the live version after a failed publish)
and now serves ``version`` on ``to_replica`` as well (None: on no new replica; ``error`` says why)."""
REQUEST_RETRIED: Final = "sampler.request_retried"
"""A ``tenant``'s request that was in flight on ``from_replica`` when it died was sent once more, to ``to_replica``
(``error``: the first try's); a second failure reaches the asker."""
SCHEDULER_DECISION: Final = "scheduler.decision"
"""The scheduler chose among several waiters for a ``resource`` (decode: an engine LoRA slot; train: the
trainer's device): ``chosen`` (best first), ``reason`` (aged / priority / fair_share) and the ``queue`` in
service order (each waiter's tenant, priority, weight, vtime = device-seconds / weight, wait_s)."""
SCHEDULER_WAIT_EXCEEDED: Final = "scheduler.wait_exceeded"
"""A ``tenant`` has waited for a ``resource`` longer than ``bound_s`` (scheduler.wait_bound_s): ``wait_s``,
its ``priority`` and the ``queue`` ahead of and behind it (a wait held back by a higher class: ``yields_to`` it and
the held ``queue``); once per wait."""
SCHEDULER_POLICY_CHANGED: Final = "scheduler.policy_changed"
"""A ``tenant``'s ``priority`` / ``weight`` changed at run time (``old_priority``, ``old_weight``); the next decision
uses them."""
SCHEDULER_PAGE_IN: Final = "scheduler.page_in"
"""A paged-out ``tenant``'s adapter ``version`` was loaded back into the engine (``lora_id``) before its requests
ran: ``duration_s`` (the page-in cost), ``resident`` adapters after it."""
SCHEDULER_YIELDED: Final = "scheduler.yielded"
"""A ``tenant``'s new work on a ``resource`` (decode: engine requests; train: a train step) is held back while
the higher classes ``to`` are active (scheduler.yield_to_higher is the ``mode``); ``queue``: every held tenant. Once
per hold; its ``priority``."""
SCHEDULER_RESUMED: Final = "scheduler.resumed"
"""A hold (scheduler.yielded) of a ``tenant`` on a ``resource`` ended after ``held_s``: ``reason`` clear (the
higher classes went idle), aged (held scheduler.aging_s: it goes anyway) or cancelled (its work was given up)."""
SCHEDULER_PAGE_OUT: Final = "scheduler.page_out"
"""A ``tenant``'s adapter (``version``, ``lora_id``) left the engine to make room for ``for_tenant`` (least
recently scheduled, no request in the engine): ``duration_s``, ``resident`` adapters after it."""

EPISODE_CONTEXT_FULL: Final = "rollout.context_full"
"""An episode stopped because no room was left in the model's context (reward 0): ``problem``, ``turn``,
``tokens``, ``max_model_len``."""

SERVE_STARTED: Final = "serve.started"
"""The HTTP server (clora serve) is ready: ``host``, ``port``, ``auth`` ("keys" or "localhost-only"), ``keys`` (how many)."""
SERVE_STOPPED: Final = "serve.stopped"
"""The HTTP server (clora serve) shut down: ``duration_s``, ``requests``, ``errors``."""
SERVE_REQUEST_FAILED: Final = "serve.request_failed"
"""An HTTP request got an error answer: ``path``, ``status``, ``error`` (the message the client got)."""
SERVE_TENANT_CREATED: Final = "serve.tenant_created"
"""A client created a tenant over HTTP (a Tinker training client): ``tenant``, ``rank``, ``key`` (its key's name)."""
SERVE_FUTURES_DROPPED: Final = "serve.futures_dropped"
"""At shutdown, Tinker futures still queued behind their model's earlier work were dropped unstarted: ``count``, ``futures``
(one entry each: its request id, kind, model, age in seconds and the await it was waiting in)."""
SERVE_FUTURES_CANCELLED: Final = "serve.futures_cancelled"
"""At shutdown, Tinker futures still running after ``bound_s`` were cancelled (a running trainer step still finishes in
the trainer; a sample is aborted): ``count``, ``still_unwinding``, ``futures`` (entries as in serve.futures_dropped)."""

CONTINUAL_VERSION_COMMITTED: Final = "continual.version_committed"
"""A continual tenant kept a new ``version`` on disk (docs/continual.md): its ``parent``, total ``steps`` and ``data``,
the ``feedback`` trained into it, the ``alias`` it got (or None) and its folder ``path``."""
CONTINUAL_PROMOTED: Final = "continual.promoted"
"""An ``alias`` now points at ``version`` (it pointed at ``previous``): the ``gate`` (None: none), the candidate's
``score``, the previous version's ``baseline`` score and the ``margin`` it had to beat."""
CONTINUAL_PROMOTION_REFUSED: Final = "continual.promotion_refused"
"""A promotion's ``gate`` refused ``version``: its ``score`` did not beat ``baseline`` (``previous``'s) by more than
``margin``; ``alias`` still points at ``previous``."""
CONTINUAL_ROLLED_BACK: Final = "continual.rolled_back"
"""An ``alias`` points back at ``version``, the version it pointed at before ``from_version``; the next request for
the alias samples ``version``."""
CONTINUAL_FEEDBACK: Final = "continual.feedback"
"""Rewards for served samples were accepted and written durably: ``accepted`` in this call, ``pending`` (accepted,
not trained yet)."""
CONTINUAL_LEARNER_STEP: Final = "continual.learner_step"
"""The learner trained ``feedback`` rewards (sequence numbers ``first_seq`` .. ``last_seq``; ``data`` sequences,
``reward_mean``) from ``parent`` into the new ``version``: ``ratio_mean`` (pi_trainer / pi_serving), ``duration_s``."""
CONTINUAL_LEARNER_SKIPPED: Final = "continual.learner_skipped"
"""A learner step used ``feedback`` rewards without training (``reason`` no-signal: every advantage was zero)."""
CONTINUAL_LEARNER_FAILED: Final = "continual.learner_failed"
"""The background learner stopped on an ``error`` (serving goes on; learn() retries the step)."""
CONTINUAL_SAMPLES_COMPACTED: Final = "continual.samples_compacted"
"""samples.jsonl was rewritten with only the samples that can still get or train on feedback: lines ``kept``
and ``dropped``, its size ``bytes_before`` -> ``bytes_after``."""
CONTINUAL_RESUMED: Final = "continual.resumed"
"""A continual tenant continues from its newest committed ``version`` after a restart: its ``aliases``,
``feedback`` accepted in all, ``pending`` not yet trained."""
CONTINUAL_CHECKED_OUT: Final = "continual.checked_out"
"""The trainer's weights and optimizer state were set back to kept version ``source``; kept again as ``version``
(its child), from which the learner continues."""

BENCH_MODE_DONE: Final = "bench.mode_done"
"""One benchmark mode finished: ``mode``, ``n``, ``final_s``."""
CLUSTER_CONNECTED: Final = "cluster.connected"
"""The runtime joined (or started) a Ray cluster (docs/scale-out.md): ``address``, ``nodes``, ``cpus``, ``gpus``,
``started_here`` (whether this process started it)."""
CLUSTER_HOST_STARTED: Final = "cluster.host_started"
"""A Ray actor hosting a runtime actor is up and its actor started (``role``: sampler or trainer, ``replica``,
``node_id``, ``pid``, ``duration_s``)."""
CLUSTER_HOST_STOPPED: Final = "cluster.host_stopped"
"""A Ray actor hosting a runtime actor stopped its actor and was released (``role``, ``replica``)."""
CLUSTER_HOST_DIED: Final = "cluster.host_died"
"""The Ray actor hosting a runtime actor died, or its actor crashed there (``role``, ``replica``, ``error``); the
driver-side proxy crashes with the same supervision as a local crash."""
CLUSTER_CALL_CANCELLED: Final = "cluster.call_cancelled"
"""Logged where the actor runs: an ask forwarded from the driver was cancelled by its asker (``message``)."""
CLUSTER_ADAPTER_SHIPPED: Final = "cluster.adapter_shipped"
"""An adapter version's PEFT files were put into Ray's object store once for every sampler replica (``tenant``,
``version``, ``size_bytes``, ``duration_s``)."""
CLUSTER_ADAPTER_RECEIVED: Final = "cluster.adapter_received"
"""Logged where the sampler runs: an adapter version's files were written to its own memory-backed folder
(``tenant``, ``version``, ``size_bytes``, ``duration_s``: from the call's start, the object store fetch included)."""


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


class JsonlSink:
    """A structlog processor that appends each event dict as one JSON line to a file.

    It passes the event dict on unchanged, so it can stand in front of any processor chain.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab", buffering=0)
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder(enc_hook=_to_jsonable)

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        record = {"ts": time.time(), "level": method_name, **event_dict}
        line = self._encoder.encode(record) + b"\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)
        return event_dict

    def close(self) -> None:
        with self._lock:
            self._file.close()


class DropBelow:
    """A structlog processor that drops events under a level (the sink before it saw them)."""

    def __init__(self, level: str) -> None:
        if level not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS, key=_LEVELS.get)}")
        self.level = _LEVELS[level]

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if _LEVELS.get(method_name, logging.INFO) < self.level:
            raise structlog.DropEvent
        return event_dict


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


def run_logger(sink: JsonlSink, console_level: str = "info") -> Any:
    """A structlog logger that writes every event (debug included) to ``sink``, then hands those at
    ``console_level`` or above to the caller's configured processors."""
    processors = [sink, DropBelow(console_level), *structlog.get_config()["processors"]]
    return structlog.wrap_logger(
        None, processors=processors, wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
    )


def read_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the events of an ``events.jsonl`` file (or of a run folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "events.jsonl"
    with p.open("rb") as f:
        for line in f:
            if line.strip():
                yield msgspec.json.decode(line)
