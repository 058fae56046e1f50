"""The samples a tenant served and the feedback its users sent about them, kept on disk.

Two append-only JSON-lines files in ``<run_dir>/tenants/<name>/continual/``:

- ``samples.jsonl``: one line per completion served from a pinned version (its id, the version,
  prompt and completion tokens, the serving version's log-probs, when): what a later reward refers to
  and what the learner trains on.
- ``feedback.jsonl``: one line per accepted reward (a sequence number, the sample id, the reward,
  when). ``accept`` returns only after the line (and the sample it names) is fsynced: accepted
  feedback survives a crash.

Which feedback is already applied is not kept here but in the version registry (clora.continual.registry),
next to the trainer state it went into. A torn last line (a crash mid-write) is skipped on reading.
Samples older than ``max_age_s`` (or beyond the newest ``max_samples``) are expired: feedback for
them is refused. Pure: no actors, no torch.

Compaction: ``samples.jsonl`` (prompt and completion tokens: the big file) is rewritten with only the
samples that can still matter (in the feedback window without feedback, or with feedback not yet
applied) once it holds more than ``COMPACT_RATIO`` times that many lines (and at least
``COMPACT_MIN_LINES``), so its size and a reopen's reading time follow the window, not the service's
age. The new file is written beside the old one, fsynced and renamed over it: a crash leaves one or
the other. ``feedback.jsonl`` stays append-only (one short line per reward; its sequence numbers must
never be reused, since the registry names applied feedback by them).
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import IO, Final

import msgspec

from clora.checkpoint.atomic import write_bytes_atomically
from clora.errors import FeedbackError, UnknownSampleError

__all__ = ["SAMPLES_FILE", "FEEDBACK_FILE", "SampleRecord", "FeedbackRecord", "FeedbackLog", "Compaction",
           "new_sample_id"]

SAMPLES_FILE: Final = "samples.jsonl"
FEEDBACK_FILE: Final = "feedback.jsonl"
COMPACT_RATIO: Final = 2.0  # rewrite samples.jsonl when it holds more than this many lines per live sample
COMPACT_MIN_LINES: Final = 4096  # ... and at least this many lines (a small file is not worth a rewrite)


class SampleRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One served completion: enough to train on it later with the serving version's log-probs."""

    id: str
    version: int
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    at: float  # wall clock when it was served


class FeedbackRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted reward for a served sample."""

    seq: int  # 0, 1, 2, ... in the order feedback was accepted
    sample: str
    reward: float
    at: float


class Compaction(msgspec.Struct, frozen=True, kw_only=True):
    """What one rewrite of samples.jsonl did."""

    kept: int  # sample lines in the new file
    dropped: int  # lines of the old file left out (expired, applied, or torn)
    bytes_before: int
    bytes_after: int


def new_sample_id() -> str:
    """A fresh sample id (random: ids of several tenants and restarts never collide)."""
    return f"smp_{secrets.token_hex(10)}"


class FeedbackLog:
    """The served samples (within the window) and the accepted feedback of one tenant."""

    def __init__(self, folder: str | Path, *, max_age_s: float, max_samples: int) -> None:
        self.folder = Path(folder)
        self.max_age_s = max_age_s
        self.max_samples = max_samples
        self._samples: dict[str, SampleRecord] = {}  # insertion order = serving order
        self._feedback: dict[int, FeedbackRecord] = {}
        self._by_sample: dict[str, FeedbackRecord] = {}
        self._dropped: set[str] = set()  # ids pushed out by max_samples (to name them "expired")
        self._rewarded: dict[str, SampleRecord] = {}  # samples with accepted feedback, until it is applied
        self._samples_file: IO[bytes] | None = None
        self._feedback_file: IO[bytes] | None = None
        self._samples_dirty = False
        self._sample_lines = 0  # lines in samples.jsonl (what a compaction would shorten)
        self._lock = threading.Lock()  # record / accept / compact: accept and compact run in worker threads
        self._encoder = msgspec.json.Encoder()

    # ------------------------------------------------------------------ open / close

    def open(self) -> FeedbackLog:
        """Read what the files hold (skipping a torn last line) and open them for appending."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for record in _read_lines(self.folder / FEEDBACK_FILE, FeedbackRecord):
            self._feedback[record.seq] = record
            self._by_sample[record.sample] = record
        samples = _read_lines(self.folder / SAMPLES_FILE, SampleRecord)
        self._sample_lines = len(samples)
        for record in samples:
            if record.id in self._by_sample:
                self._rewarded[record.id] = record
            elif now - record.at <= self.max_age_s:
                self._keep_sample(record)
        self._samples_file = _append(self.folder / SAMPLES_FILE)
        self._feedback_file = _append(self.folder / FEEDBACK_FILE)
        return self

    def close(self) -> None:
        for f in (self._samples_file, self._feedback_file):
            if f is not None and not f.closed:
                f.close()

    # ------------------------------------------------------------------ samples

    def record(self, record: SampleRecord) -> None:
        """Remember a served sample (written now; fsynced before feedback naming it is accepted)."""
        with self._lock:
            self._samples_file.write(self._encoder.encode(record) + b"\n")
            self._samples_dirty = True
            self._sample_lines += 1
            self._keep_sample(record)

    def _keep_sample(self, record: SampleRecord) -> None:
        self._samples[record.id] = record
        while len(self._samples) > self.max_samples:
            oldest = next(iter(self._samples))
            del self._samples[oldest]
            self._dropped.add(oldest)

    def sample(self, sample_id: str) -> SampleRecord:
        """The served sample ``sample_id``; UnknownSampleError if never served here or expired."""
        record = self._samples.get(sample_id)
        if record is not None and time.time() - record.at <= self.max_age_s:
            return record
        if record is not None or sample_id in self._dropped:
            age = "" if record is None else f", served {time.time() - record.at:.0f} s ago"
            raise UnknownSampleError(f"sample {sample_id!r} has expired{age} (feedback window: {self.max_age_s:g} s, "
                                     f"{self.max_samples} samples)")
        raise UnknownSampleError(f"unknown sample id {sample_id!r}: this tenant never served it "
                                 "(or it expired before a restart)")

    def expire(self) -> int:
        """Forget samples older than the window (those without feedback can no longer get any)."""
        now = time.time()
        old = [k for k, r in self._samples.items() if now - r.at > self.max_age_s]
        for k in old:
            del self._samples[k]
            self._dropped.add(k)
        return len(old)

    # ------------------------------------------------------------------ feedback

    def check(self, sample_id: str, reward: float) -> FeedbackRecord | None:
        """Validate one reward without accepting it: the existing record when it repeats an accepted one
        exactly (a retry), None when it is new; a clear error otherwise."""
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            raise FeedbackError(f"reward for sample {sample_id!r} must be a finite number, got {reward!r}")
        done = self._by_sample.get(sample_id)
        if done is not None:
            if done.reward == float(reward):
                return done
            raise FeedbackError(f"sample {sample_id!r} already has the reward {done.reward} "
                                f"(feedback #{done.seq}); a different one ({reward}) is refused")
        self.sample(sample_id)
        return None

    def accept(self, items: list[tuple[str, float]]) -> list[FeedbackRecord]:
        """Accept rewards (all or none: each is checked first), durably. A repeat of an accepted reward is
        a no-op that returns the earlier record."""
        with self._lock:
            return self._accept(items)

    def _accept(self, items: list[tuple[str, float]]) -> list[FeedbackRecord]:
        out: list[FeedbackRecord | None] = []
        seen: dict[str, float] = {}
        for sample_id, reward in items:
            if sample_id in seen and seen[sample_id] != float(reward):
                raise FeedbackError(f"sample {sample_id!r} is given two different rewards in one batch")
            seen[sample_id] = float(reward)
            out.append(self.check(sample_id, reward))
        now = time.time()
        seq = max(self._feedback, default=-1) + 1
        fresh: dict[str, FeedbackRecord] = {}
        lines = []
        for (sample_id, reward), done in zip(items, out):
            if done is None and sample_id not in fresh:
                fresh[sample_id] = FeedbackRecord(seq=seq, sample=sample_id, reward=float(reward), at=now)
                lines.append(self._encoder.encode(fresh[sample_id]) + b"\n")
                seq += 1
        if lines:
            if self._samples_dirty:  # the samples named must be on disk before the feedback naming them
                _sync(self._samples_file)
                self._samples_dirty = False
            self._feedback_file.write(b"".join(lines))
            _sync(self._feedback_file)
            for record in fresh.values():
                self._feedback[record.seq] = record
                self._by_sample[record.sample] = record
                self._rewarded[record.sample] = self._samples.pop(record.sample)
        return [done if done is not None else fresh[sample_id] for (sample_id, _), done in zip(items, out)]

    def pending(self, applied: set[int]) -> list[FeedbackRecord]:
        """Accepted feedback not in ``applied``, oldest first."""
        return [self._feedback[s] for s in sorted(self._feedback) if s not in applied]

    def sample_of(self, record: FeedbackRecord) -> SampleRecord | None:
        """The sample a feedback record names (kept until ``forget`` once its feedback is applied)."""
        return self._rewarded.get(record.sample)

    def forget(self, applied: set[int]) -> None:
        """Drop the samples of applied feedback from memory (the files keep them)."""
        for seq in applied:
            record = self._feedback.get(seq)
            if record is not None:
                self._rewarded.pop(record.sample, None)

    # ------------------------------------------------------------------ compaction

    def compact(self, *, force: bool = False) -> Compaction | None:
        """Rewrite samples.jsonl with only the live samples (see the module doc) when it is due, or always
        with ``force``; None when it was not due. Call it after ``forget`` (applied samples are then gone)."""
        with self._lock:
            self.expire()
            live = sorted([*self._samples.values(), *self._rewarded.values()], key=lambda r: r.at)
            if not force and (self._sample_lines < COMPACT_MIN_LINES
                              or self._sample_lines <= COMPACT_RATIO * len(live)):
                return None
            path = self.folder / SAMPLES_FILE
            self._samples_file.close()
            before = path.stat().st_size
            try:  # a failed rewrite leaves the old file whole; appending goes on either way
                write_bytes_atomically(path, b"".join(self._encoder.encode(r) + b"\n" for r in live), durable=True)
            finally:
                self._samples_file = _append(path)
            self._samples_dirty = False
            dropped, self._sample_lines = self._sample_lines - len(live), len(live)
            return Compaction(kept=len(live), dropped=dropped, bytes_before=before, bytes_after=path.stat().st_size)

    def __len__(self) -> int:
        return len(self._feedback)


def _append(path: Path) -> IO[bytes]:
    f = path.open("ab")
    return f


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _read_lines(path: Path, type_: type) -> list:
    if not path.is_file():
        return []
    out = []
    decoder = msgspec.json.Decoder(type_)
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            out.append(decoder.decode(line))
        except msgspec.DecodeError:
            continue  # a torn line from a crash mid-write: it was never acknowledged
    return out
