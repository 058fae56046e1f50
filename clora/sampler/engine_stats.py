"""What the vLLM engine actually did: prompt tokens computed vs served from its prefix cache, and
how large its decode batches were.

vLLM's engine core reports, with every step, a ``SchedulerStats`` (running / waiting requests,
prefix-cache queries and hits of the requests admitted, and with ``enable_logging_iteration_details``
the step's prefill and decode request counts and its duration) and, per batch of outputs, an
``IterationStats`` (prompt tokens computed vs cached, generated tokens). ``EngineStats`` adds them
up, and times the steps by when their stats arrive (vLLM's own ``elapsed_ms`` covers only the
sampling, not the forward pass); ``stat_logger_factory`` is the vLLM stat logger that feeds one (pass it to
``AsyncLLM.from_engine_args(stat_loggers=[...])``). Only the logger imports vLLM, so the
accumulator is tested without an engine.

All counters are cumulative; ``EngineStats.window(previous)`` gives the difference to an older
``snapshot()`` (what happened in between), which the sampler logs as ``sampler.engine_stats``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import msgspec

__all__ = ["BATCH_BUCKETS", "EngineStats", "EngineStatsSnapshot", "bucket_label", "combine_snapshots",
           "stat_logger_factory"]

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
"""Lower bounds of the decode batch histogram's buckets: 1, 2-3, 4-7, ..., 64-127, 128+."""


def bucket_label(size: int) -> str:
    """The histogram bucket of a decode batch of ``size`` requests: '1', '2-3', ..., '128+'."""
    if size < 1:
        raise ValueError(f"a decode batch has at least one request, got {size}")
    for low, high in zip(BATCH_BUCKETS, BATCH_BUCKETS[1:]):
        if size < high:
            return str(low) if high == low + 1 else f"{low}-{high - 1}"
    return f"{BATCH_BUCKETS[-1]}+"


class EngineStatsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative engine counters at one moment (or, from ``window``, the difference of two)."""

    steps: int = 0  # engine steps that scheduled work
    busy_s: float = 0.0  # engine time in steps that followed a step leaving work (arrival to arrival)
    prompt_tokens: int = 0  # prompt tokens of admitted requests (n=G counts G prompts)
    prompt_tokens_computed: int = 0  # ... of them prefilled by the model
    prompt_tokens_cached: int = 0  # ... of them served from the prefix cache
    prefix_queries: int = 0  # tokens looked up in the prefix cache (requests admitted)
    prefix_hits: int = 0  # ... of them found
    requests_admitted: int = 0
    generation_tokens: int = 0
    prefill_steps: int = 0  # steps with at least one request prefilling
    decode_steps: int = 0  # steps with at least one request decoding
    decode_rows: int = 0  # sum over steps of the requests decoding in it
    decode_batch_max: int = 0  # not a difference in a window: the largest in that window is unknown
    running_sum: int = 0  # sum over steps of the requests running (prefill + decode)
    waiting_max: int = 0  # largest number of requests waiting at a step (max over the whole life)
    decode_batches: dict[str, int] = {}  # bucket_label -> steps with a decode batch of that size
    replicas: tuple[EngineStatsSnapshot, ...] = ()  # a sampler pool's sum: each replica's own (combine_snapshots)

    @property
    def cached_fraction(self) -> float:
        """Share of prompt tokens served from the prefix cache."""
        return self.prompt_tokens_cached / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def decode_batch_mean(self) -> float:
        """Mean number of requests decoding per step that decoded."""
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    def minus(self, previous: EngineStatsSnapshot) -> EngineStatsSnapshot:
        """The counters from ``previous`` (an older snapshot of the same engine) to this one;
        ``decode_batch_max`` and ``waiting_max`` stay this snapshot's (life-long) values."""
        diff: dict[str, Any] = {}
        for name in EngineStatsSnapshot.__struct_fields__:
            value, old = getattr(self, name), getattr(previous, name)
            if name in ("decode_batch_max", "waiting_max"):
                diff[name] = value
            elif name == "replicas":  # replica by replica, while the pool has the same replicas
                diff[name] = tuple(a.minus(b) for a, b in zip(value, old)) if len(value) == len(old) else ()
            elif name == "decode_batches":
                diff[name] = {k: v - old.get(k, 0) for k, v in value.items() if v - old.get(k, 0)}
            else:
                diff[name] = value - old
        return EngineStatsSnapshot(**diff)

    def fields(self) -> dict[str, Any]:
        """Flat, rounded fields for an event line."""
        out = msgspec.structs.asdict(self)
        out.pop("replicas")
        out["busy_s"] = round(self.busy_s, 3)
        out["cached_fraction"] = round(self.cached_fraction, 4)
        out["decode_batch_mean"] = round(self.decode_batch_mean, 2)
        out["decode_batches"] = dict(self.decode_batches)
        return out


def combine_snapshots(parts: list[EngineStatsSnapshot | None]) -> EngineStatsSnapshot | None:
    """Several engines' snapshots as one (a sampler pool's replicas): counters summed, maxima the largest,
    each engine's own in ``replicas``; None when no engine keeps statistics."""
    kept = [p for p in parts if p is not None]
    if not kept:
        return None
    total: dict[str, Any] = {}
    for name in EngineStatsSnapshot.__struct_fields__:
        values = [getattr(p, name) for p in kept]
        if name in ("decode_batch_max", "waiting_max"):
            total[name] = max(values)
        elif name == "decode_batches":
            total[name] = dict(sum((Counter(v) for v in values), Counter()))
        elif name != "replicas":
            total[name] = sum(values)
    return EngineStatsSnapshot(**total, replicas=tuple(kept))


class EngineStats:
    """Cumulative counters of one engine, fed by vLLM's stat logger (one thread: the event loop)."""

    def __init__(self) -> None:
        self.steps = 0
        self.busy_s = 0.0
        self.prompt_tokens = 0
        self.prompt_tokens_computed = 0
        self.prompt_tokens_cached = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.requests_admitted = 0
        self.generation_tokens = 0
        self.prefill_steps = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.decode_batch_max = 0
        self.running_sum = 0
        self.waiting_max = 0
        self.decode_batches: Counter[str] = Counter()
        self._last_busy_at: float | None = None

    def observe_step(
        self,
        *,
        running: int,
        waiting: int,
        prefix_requests: int,
        prefix_queries: int,
        prefix_hits: int,
        prefill_requests: int | None,
        decode_requests: int | None,
        now: float,
    ) -> None:
        """One engine step's scheduler stats, arrived at ``now`` (monotonic seconds).
        ``prefill_requests`` / ``decode_requests`` are None when vLLM attached no iteration
        details (a step that scheduled nothing)."""
        if self._last_busy_at is not None:  # the previous step left work: this step ran from then to now
            self.busy_s += max(0.0, now - self._last_busy_at)
        # Requests left running or waiting: the engine starts its next step at once.
        self._last_busy_at = now if running + waiting > 0 else None
        self.requests_admitted += prefix_requests
        self.prefix_queries += prefix_queries
        self.prefix_hits += prefix_hits
        self.waiting_max = max(self.waiting_max, waiting)
        if decode_requests is None or prefill_requests is None:
            return
        if prefill_requests + decode_requests == 0:
            return
        self.steps += 1
        self.running_sum += running
        if prefill_requests:
            self.prefill_steps += 1
        if decode_requests:
            self.decode_steps += 1
            self.decode_rows += decode_requests
            self.decode_batch_max = max(self.decode_batch_max, decode_requests)
            self.decode_batches[bucket_label(decode_requests)] += 1

    def observe_outputs(self, *, prompt_tokens: int, computed: int, cached: int, generated: int) -> None:
        """One batch of outputs' iteration stats: prompt tokens that finished prefilling, generated tokens."""
        self.prompt_tokens += prompt_tokens
        self.prompt_tokens_computed += computed
        self.prompt_tokens_cached += cached
        self.generation_tokens += generated

    def snapshot(self) -> EngineStatsSnapshot:
        return EngineStatsSnapshot(
            steps=self.steps, busy_s=self.busy_s, prompt_tokens=self.prompt_tokens,
            prompt_tokens_computed=self.prompt_tokens_computed, prompt_tokens_cached=self.prompt_tokens_cached,
            prefix_queries=self.prefix_queries, prefix_hits=self.prefix_hits,
            requests_admitted=self.requests_admitted, generation_tokens=self.generation_tokens,
            prefill_steps=self.prefill_steps, decode_steps=self.decode_steps, decode_rows=self.decode_rows,
            decode_batch_max=self.decode_batch_max, running_sum=self.running_sum, waiting_max=self.waiting_max,
            decode_batches=dict(self.decode_batches),
        )

    def window(self, previous: EngineStatsSnapshot) -> EngineStatsSnapshot:
        """What happened since ``previous`` (a snapshot of this object); maxima are life-long."""
        return self.snapshot().minus(previous)


def stat_logger_factory(stats: EngineStats):
    """A vLLM per-engine stat logger factory that feeds ``stats`` (imports vLLM)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _CloraStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                prefix = scheduler_stats.prefix_cache_stats
                details = scheduler_stats.iteration_details
                stats.observe_step(
                    running=scheduler_stats.num_running_reqs, waiting=scheduler_stats.num_waiting_reqs,
                    prefix_requests=prefix.requests if prefix is not None else 0,
                    prefix_queries=prefix.queries if prefix is not None else 0,
                    prefix_hits=prefix.hits if prefix is not None else 0,
                    prefill_requests=None if details is None or details.is_dummy else details.num_ctx_requests,
                    decode_requests=None if details is None or details.is_dummy else details.num_generation_requests,
                    now=time.monotonic(),
                )
            if iteration_stats is not None:
                prompt = iteration_stats.prompt_token_stats
                stats.observe_outputs(prompt_tokens=prompt.total, computed=prompt.computed,
                                      cached=prompt.cached_tokens, generated=iteration_stats.num_generation_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return _CloraStatLogger
