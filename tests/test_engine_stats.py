"""EngineStats: the prefix-cache and decode-batch accounting fed by vLLM's stat logger."""

from __future__ import annotations

import pytest

from clora.sampler.engine_stats import EngineStats, bucket_label, stat_logger_factory


def _step(stats: EngineStats, *, now: float, running: int = 0, waiting: int = 0, prefill: int | None = 0,
          decode: int | None = 0, requests: int = 0, queries: int = 0, hits: int = 0) -> None:
    stats.observe_step(running=running, waiting=waiting, prefix_requests=requests, prefix_queries=queries,
                       prefix_hits=hits, prefill_requests=prefill, decode_requests=decode, now=now)


def test_bucket_labels_cover_every_batch_size_once():
    assert [bucket_label(n) for n in (1, 2, 3, 4, 7, 8, 63, 64, 127, 128, 500)] == [
        "1", "2-3", "2-3", "4-7", "4-7", "8-15", "32-63", "64-127", "64-127", "128+", "128+"]
    with pytest.raises(ValueError):
        bucket_label(0)


def test_steps_count_decode_batches_and_prefills():
    stats = EngineStats()
    _step(stats, now=0.0, running=8, prefill=8, decode=0, requests=8, queries=8 * 240, hits=7 * 128)
    _step(stats, now=0.1, running=8, prefill=0, decode=8)
    _step(stats, now=0.2, running=3, prefill=0, decode=8)
    _step(stats, now=0.3, running=0, prefill=0, decode=3)
    _step(stats, now=9.0, running=0, prefill=None, decode=None)  # no details: nothing was scheduled
    snap = stats.snapshot()
    assert (snap.steps, snap.prefill_steps, snap.decode_steps, snap.decode_rows) == (4, 1, 3, 19)
    assert snap.decode_batches == {"8-15": 2, "2-3": 1} and snap.decode_batch_max == 8
    assert snap.decode_batch_mean == pytest.approx(19 / 3)
    assert (snap.requests_admitted, snap.prefix_queries, snap.prefix_hits) == (8, 1920, 896)
    assert snap.running_sum == 8 + 8 + 3 + 0


def test_busy_time_counts_steps_that_followed_work_not_idle_gaps():
    stats = EngineStats()
    _step(stats, now=10.0, running=2, decode=2)  # the first step: its start is unknown
    _step(stats, now=10.5, running=2, decode=2)  # ran 10.0 -> 10.5
    _step(stats, now=11.0, running=0, decode=2)  # ran 10.5 -> 11.0, left nothing
    _step(stats, now=50.0, running=1, prefill=1)  # after an idle gap: not counted
    _step(stats, now=50.2, running=0, waiting=0, decode=1)  # 50.0 -> 50.2
    assert stats.snapshot().busy_s == pytest.approx(1.2)


def test_output_tokens_split_into_computed_and_cached():
    stats = EngineStats()
    stats.observe_outputs(prompt_tokens=240, computed=240, cached=0, generated=1)
    stats.observe_outputs(prompt_tokens=480, computed=224, cached=256, generated=2)
    snap = stats.snapshot()
    assert (snap.prompt_tokens, snap.prompt_tokens_computed, snap.prompt_tokens_cached) == (720, 464, 256)
    assert snap.cached_fraction == pytest.approx(256 / 720) and snap.generation_tokens == 3


def test_window_is_the_difference_of_two_snapshots():
    stats = EngineStats()
    _step(stats, now=0.0, running=4, decode=4)
    stats.observe_outputs(prompt_tokens=100, computed=100, cached=0, generated=4)
    before = stats.snapshot()
    _step(stats, now=0.1, running=2, decode=2, waiting=5)
    stats.observe_outputs(prompt_tokens=50, computed=10, cached=40, generated=2)
    window = stats.window(before)
    assert (window.steps, window.decode_rows, window.decode_batches) == (1, 2, {"2-3": 1})
    assert (window.prompt_tokens, window.prompt_tokens_cached, window.generation_tokens) == (50, 40, 2)
    assert window.busy_s == pytest.approx(0.1) and window.waiting_max == 5
    fields = window.fields()
    assert fields["cached_fraction"] == 0.8 and fields["decode_batch_mean"] == 2.0
    assert stats.window(stats.snapshot()).steps == 0


def test_the_vllm_stat_logger_feeds_the_counters():
    from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerIterationDetails, SchedulerStats

    stats = EngineStats()
    logger = stat_logger_factory(stats)(None, 0)
    prefix = PrefixCacheStats()
    prefix.record(num_tokens=240, num_hits=128, preempted=False)
    details = SchedulerIterationDetails(iteration_index=0, num_ctx_requests=1, num_ctx_tokens=112,
                                        num_generation_requests=5, num_generation_tokens=5, elapsed_ms=3.0)
    iteration = IterationStats()
    iteration.num_generation_tokens = 6
    iteration.prompt_token_stats.computed, iteration.prompt_token_stats.cached_tokens = 112, 128
    iteration.prompt_token_stats.total = 240
    logger.record(SchedulerStats(num_running_reqs=6, prefix_cache_stats=prefix, iteration_details=details), iteration)
    logger.record(SchedulerStats(num_running_reqs=0), None)  # a step without details counts no batch
    snap = stats.snapshot()
    assert (snap.steps, snap.prefill_steps, snap.decode_rows, snap.decode_batches) == (1, 1, 5, {"4-7": 1})
    assert (snap.prefix_queries, snap.prefix_hits, snap.requests_admitted) == (240, 128, 1)
    assert (snap.prompt_tokens, snap.prompt_tokens_computed, snap.prompt_tokens_cached) == (240, 112, 128)
    assert snap.generation_tokens == 6


def test_minus_is_the_stretch_between_two_snapshots_with_life_long_maxima():
    stats = EngineStats()
    _step(stats, now=0.0, running=8, decode=8, waiting=3)
    older = stats.snapshot()
    _step(stats, now=0.1, running=2, decode=2)
    stats.observe_outputs(prompt_tokens=30, computed=30, cached=0, generated=2)
    stretch = stats.snapshot().minus(older)
    assert (stretch.decode_rows, stretch.decode_batches, stretch.prompt_tokens) == (2, {"2-3": 1}, 30)
    assert (stretch.decode_batch_max, stretch.waiting_max) == (8, 3)  # maxima are not differences


async def test_the_runtime_reports_the_engines_counters_since_it_started(tiny_model_dir, tmp_path):
    """Runtime.engine_stats asks the sampler (GetEngineStats); the run's events end with the totals line."""
    import clora.runtime
    from clora import events
    from clora.config import ModelConfig, RuntimeConfig
    from clora.testing import Events, FakeEngine

    engine = FakeEngine(["ab"], read_adapters=False)
    engine.stats = EngineStats()
    engine.stats.observe_outputs(prompt_tokens=500, computed=500, cached=0, generated=0)  # before: not counted
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path))
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        start = await rt.engine_stats()
        engine.stats.observe_outputs(prompt_tokens=240, computed=112, cached=128, generated=3)
        now = await rt.engine_stats()
        assert (start.prompt_tokens, now.prompt_tokens, now.minus(start).prompt_tokens_cached) == (0, 240, 128)
    totals = Events.from_run(tmp_path).named(events.ENGINE_TOTALS)
    assert totals.field("prompt_tokens") == [240] and totals.field("prompt_tokens_computed") == [112]
    async with clora.runtime.Runtime(config, console_level="critical",
                                     engine=FakeEngine(["ab"], read_adapters=False)) as rt:
        assert await rt.engine_stats() is None  # an engine that keeps no counters
