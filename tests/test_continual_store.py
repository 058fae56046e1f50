"""The continual tenant's files, without a runtime: the version registry (lineage, aliases, rollback,
applied feedback) and the feedback log (durable accept, torn lines, unknown / expired ids, retries)."""

from __future__ import annotations

import time

import msgspec

import pytest

from clora.continual.feedback import FEEDBACK_FILE, FeedbackLog, SampleRecord
from clora.continual.learner import LearnerPolicy, due, feedback_data
from clora.continual.registry import Registry
from clora.errors import ConfigError, FeedbackError, UnknownSampleError, UnknownVersionError


def _registry(tmp_path, versions=(0, 1, 2)) -> Registry:
    registry = Registry(tmp_path, "t")
    for v in versions:
        registry.add(registry.child(v, parent=None if v == 0 else v - 1, steps=v, data=4, feedback=[10 + v]))
    return registry


def test_aliases_point_roll_back_and_survive_a_reload(tmp_path):
    registry = _registry(tmp_path)
    assert registry.point("production", 0) is None
    assert registry.point("production", 2) == 0
    registry.point("candidate", 1)
    registry.save()
    again = Registry.load(tmp_path, "t")
    assert again.aliases() == {"production": 2, "candidate": 1}
    assert [v.parent for v in again.versions()] == [None, 0, 1] and again.get(2).data == 12
    assert again.resolve("production") == 2 and again.resolve(1) == 1 and again.resolve("v0") == 0
    assert again.rollback("production") == (2, 0)
    assert again.resolve("production") == 0
    with pytest.raises(UnknownVersionError, match="no earlier version"):
        again.rollback("production")
    with pytest.raises(UnknownVersionError, match="no alias 'staging'"):
        again.resolve("staging")
    with pytest.raises(UnknownVersionError, match="no version 7"):
        again.point("production", 7)
    with pytest.raises(ConfigError, match="alias"):
        again.point("7up", 1)  # an alias never looks like a version number
    assert again.applied_feedback() == {10, 11, 12}


def _log(tmp_path, **kw) -> FeedbackLog:
    return FeedbackLog(tmp_path, max_age_s=kw.get("max_age_s", 60.0), max_samples=kw.get("max_samples", 100)).open()


def _sample(i: int, at: float | None = None) -> SampleRecord:
    return SampleRecord(id=f"s{i}", version=3, prompt=[1, 2], tokens=[5 + i], logprobs=[-0.5], at=at or time.time())


def test_accepted_feedback_is_on_disk_before_accept_returns_and_a_torn_line_is_skipped(tmp_path):
    log = _log(tmp_path)
    for i in range(3):
        log.record(_sample(i))
    log.accept([("s2", 1.0), ("s0", 0.0)])
    # no close(): what a crash leaves, plus half a line of a write that never returned
    (tmp_path / FEEDBACK_FILE).open("ab").write(b'{"seq": 2, "sample": "s1", "rew')
    again = _log(tmp_path)
    assert [(f.seq, f.sample, f.reward) for f in again.pending(set())] == [(0, "s2", 1.0), (1, "s0", 0.0)]
    assert [(f.sample) for f in again.pending({0})] == ["s0"]
    assert again.sample_of(again.pending(set())[0]).tokens == [7]
    again.accept([("s1", 0.5)])  # the torn line's sample can still get its feedback
    assert [f.seq for f in again.pending(set())] == [0, 1, 2]


def test_unknown_expired_and_conflicting_feedback_each_get_one_clear_error(tmp_path):
    log = _log(tmp_path, max_age_s=10.0, max_samples=2)
    log.record(_sample(0, at=time.time() - 60))
    for i in (1, 2, 3):
        log.record(_sample(i))
    with pytest.raises(UnknownSampleError, match="unknown sample id 'nope'"):
        log.accept([("nope", 1.0)])
    with pytest.raises(UnknownSampleError, match="expired"):
        log.accept([("s1", 1.0)])  # pushed out by max_samples=2
    with pytest.raises(UnknownSampleError, match="expired"):
        log.check("s0", 1.0)  # served 60 s ago, window 10 s
    with pytest.raises(FeedbackError, match="finite"):
        log.accept([("s2", float("nan"))])
    with pytest.raises(UnknownSampleError):
        log.accept([("s2", 1.0), ("nope", 1.0)])  # all or none
    assert log.pending(set()) == []
    first = log.accept([("s2", 1.0)])
    assert log.accept([("s2", 1.0)]) == first  # a retry of the same reward: the same record, not a second one
    with pytest.raises(FeedbackError, match="already has the reward"):
        log.accept([("s2", 0.0)])
    assert len(log.pending(set())) == 1


def test_feedback_data_carries_the_serving_versions_logprobs_and_batch_mean_advantages(tmp_path):
    log = _log(tmp_path)
    for i in range(2):
        log.record(_sample(i))
    records = log.accept([("s0", 1.0), ("s1", 0.0)])
    data = feedback_data(LearnerPolicy(), [(r, log.sample_of(r)) for r in records])
    assert [d.tokens for d in data] == [[1, 2, 5], [1, 2, 6]]
    assert [d.advantages for d in data] == [[0.0, 0.0, 0.5], [0.0, 0.0, -0.5]]
    assert [d.sampler_logprobs for d in data] == [[0.0, 0.0, -0.5]] * 2
    assert {d.sampler_version for d in data} == {3}
    policy = LearnerPolicy(min_batch=3, max_age_s=5.0)
    assert not due(policy, records, now=records[0].at + 1) and due(policy, records, now=records[0].at + 6)


def test_compaction_keeps_exactly_the_samples_that_can_still_matter_and_a_reopen_sees_the_same_log(tmp_path,
                                                                                                  monkeypatch):
    from clora.continual import feedback as fb
    from clora.continual.feedback import SAMPLES_FILE

    log = _log(tmp_path, max_age_s=30.0, max_samples=1000)
    log.record(_sample(0, at=time.time() - 60))  # expired: no feedback can come for it any more
    for i in range(1, 7):
        log.record(_sample(i))
    log.accept([("s1", 1.0), ("s2", 0.0), ("s3", 0.5)])
    log.forget({0, 1})  # s1 and s2's feedback is applied (in the registry); s3's is pending
    assert log.compact() is None  # 7 lines: far below COMPACT_MIN_LINES
    done = log.compact(force=True)
    assert (done.kept, done.dropped) == (4, 3) and done.bytes_after < done.bytes_before
    kept = (tmp_path / SAMPLES_FILE).read_bytes().splitlines()
    assert [msgspec.json.decode(x)["id"] for x in kept] == ["s3", "s4", "s5", "s6"]
    log.record(_sample(7))  # appending goes on in the new file
    log.accept([("s7", 1.0)])
    log.close()

    again = _log(tmp_path, max_age_s=30.0, max_samples=1000)
    assert [(f.seq, f.sample) for f in again.pending({0, 1})] == [(2, "s3"), (3, "s7")]
    assert again.sample_of(again.pending({0, 1})[0]).tokens == [8]  # the pending feedback's sample survived
    again.accept([("s4", 1.0)])  # a windowed sample can still get feedback
    with pytest.raises(UnknownSampleError):
        again.accept([("s0", 1.0)])
    assert again.accept([("s1", 1.0)])[0].seq == 0  # an applied reward's retry is still recognised

    # due by size: more than COMPACT_RATIO lines per live sample, and at least COMPACT_MIN_LINES
    monkeypatch.setattr(fb, "COMPACT_MIN_LINES", 8)
    for i in range(10, 20):
        again.record(_sample(i, at=time.time() - 60))  # all expired at once
    assert again.compact() is not None and again.compact() is None
