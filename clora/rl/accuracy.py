"""Held-out accuracy as a count with a confidence interval.

A held-out set of n problems measures a proportion: with n = 16 one problem is 6 points and
two runs of the same recipe differ by 10 points by chance. ``HeldOutScore`` keeps the count
(``correct`` of ``total``) so every report can say how sure it is, and pooled counts over seeds
give one interval for a recipe.

The interval is Wilson's score interval: the proportions p whose normal test against the
observed ``correct / total`` does not reject at level 1 - confidence. Unlike the textbook
p +- z * sqrt(p (1 - p) / n) it stays inside [0, 1] and is not zero-width at 0/n or n/n.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import msgspec

__all__ = ["HeldOutScore", "Z_95", "wilson_interval"]

Z_95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054: two-sided 95%


def wilson_interval(correct: int, total: int, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of ``correct / total`` (95% with the default ``z``); (0, 1) when total is 0.

    With p = correct / total::

        centre = (p + z^2 / (2 n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    """
    if total < 0 or not 0 <= correct <= max(total, 0):
        raise ValueError(f"need 0 <= correct <= total, got {correct} of {total}")
    if total == 0:
        return 0.0, 1.0
    n, p, z2 = float(total), correct / total, z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class HeldOutScore(msgspec.Struct, frozen=True, kw_only=True):
    """``correct`` of ``total`` held-out problems solved (greedy, one episode each); ``by_kind``: the same
    count per ``Problem.kind`` (kind -> (correct, total)), for problems that name their kind."""

    correct: int
    total: int
    by_kind: dict[str, tuple[int, int]] = {}

    def __post_init__(self) -> None:
        if self.total < 0 or not 0 <= self.correct <= self.total:
            raise ValueError(f"need 0 <= correct <= total, got {self.correct} of {self.total}")

    @property
    def accuracy(self) -> float:
        """correct / total (0.0 for an empty set)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson score interval of the accuracy."""
        return wilson_interval(self.correct, self.total)

    @classmethod
    def from_accuracy(cls, accuracy: float, total: int) -> "HeldOutScore":
        """The count behind an accuracy measured on ``total`` problems (accuracy = correct / total)."""
        return cls(correct=round(accuracy * total), total=total)
