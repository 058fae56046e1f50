"""Continual learning: named versions with lineage, aliases, pinned sampling, feedback, a learner,
promotion gates and rollback (docs/continual.md)."""

from clora.continual.feedback import FeedbackRecord, SampleRecord
from clora.continual.gate import Gate, Promotion
from clora.continual.learner import LearnerPolicy
from clora.continual.registry import VersionInfo

__all__ = ["LearnerPolicy", "VersionInfo", "Promotion", "Gate", "FeedbackRecord", "SampleRecord"]
