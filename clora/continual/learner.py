"""When and how accumulated feedback becomes a training step (pure: no actors, no torch).

``LearnerPolicy`` says when a step is due (``min_batch`` feedback pending, or the oldest pending
one older than ``max_age_s``), how much one step takes (``max_batch``), the loss, and which alias
the new version gets (``candidate``). ``feedback_data`` turns feedback into training data: each
rewarded completion is one sequence, its advantage the reward minus the batch's baseline, its
``sampler_logprobs`` the serving version's log-probs and its ``sampler_version`` that version, so
the loss's importance ratio pi_trainer / pi_serving corrects for the learner having moved on since
(clora.rl.losses; ``ppo`` clips it).
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from clora.config import LossConfig
from clora.continual.feedback import FeedbackRecord, SampleRecord
from clora.errors import ConfigError
from clora.messages import Datum

__all__ = ["LearnerPolicy", "due", "feedback_data"]


class LearnerPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a continual tenant learns from feedback (``rt.tenant(name, continual=LearnerPolicy(...))``)."""

    min_batch: int = 8  # a step is due once this much feedback is pending ...
    max_age_s: float = 60.0  # ... or once the oldest pending feedback is this old (and at least one is)
    max_batch: int = 64  # at most this much feedback per step (the oldest first)
    loss: LossConfig = LossConfig(kind="ppo")  # ratio pi_trainer / pi_serving, clipped
    baseline: Literal["batch_mean"] | float = "batch_mean"  # advantage = reward - baseline
    alias: str | None = "candidate"  # the alias each learned version gets (None: none)
    auto: bool = True  # learn in the background as feedback arrives (False: only on learn())
    sample_max_age_s: float = 86400.0  # feedback for a sample older than this is refused (expired)
    max_samples: int = 100_000  # samples remembered for feedback; older ones expire
    max_live_versions: int = 4  # versions of this tenant registered in the engine at once

    def __post_init__(self) -> None:
        if self.min_batch < 1:
            raise ConfigError(f"continual.min_batch must be >= 1, got {self.min_batch}")
        if self.max_batch < self.min_batch:
            raise ConfigError(f"continual.max_batch ({self.max_batch}) must be >= min_batch ({self.min_batch})")
        if not self.max_age_s > 0 or not self.sample_max_age_s > 0:
            raise ConfigError("continual.max_age_s and continual.sample_max_age_s must be > 0")
        if self.max_samples < 1 or self.max_live_versions < 1:
            raise ConfigError("continual.max_samples and continual.max_live_versions must be >= 1")
        if self.loss.kind == "cross_entropy":
            raise ConfigError("continual.loss: cross_entropy ignores rewards; use ppo, cispo or importance_sampling")


def due(policy: LearnerPolicy, pending: list[FeedbackRecord], now: float | None = None) -> bool:
    """Whether the pending feedback makes a learner step due now."""
    if not pending:
        return False
    now = time.time() if now is None else now
    return len(pending) >= policy.min_batch or now - pending[0].at >= policy.max_age_s


def seconds_until_due(policy: LearnerPolicy, pending: list[FeedbackRecord], now: float | None = None) -> float | None:
    """How long until ``max_age_s`` makes a step due (None: nothing pending; 0: due now)."""
    if not pending:
        return None
    now = time.time() if now is None else now
    return 0.0 if due(policy, pending, now) else pending[0].at + policy.max_age_s - now


def feedback_data(policy: LearnerPolicy, items: list[tuple[FeedbackRecord, SampleRecord]]) -> list[Datum]:
    """One training sequence per rewarded sample (see the module docstring); advantages all zero when
    every reward equals the baseline (no signal)."""
    rewards = [f.reward for f, _ in items]
    baseline = sum(rewards) / len(rewards) if policy.baseline == "batch_mean" else float(policy.baseline)
    data = []
    for feedback, sample in items:
        advantage = feedback.reward - baseline
        n_prompt, n_completion = len(sample.prompt), len(sample.tokens)
        mask = [0.0] * n_prompt + [1.0] * n_completion
        data.append(Datum(
            tokens=[*sample.prompt, *sample.tokens],
            loss_mask=mask,
            advantages=[advantage * m for m in mask],
            sampler_logprobs=[0.0] * n_prompt + list(sample.logprobs),
            sampler_version=sample.version,
        ))
    return data
