"""The environment protocol: problems, episodes, outcomes, and the reward check.

An ``Env`` hands out ``Problem``s (a training stream and a fixed held-out split) and starts an
``Episode`` per rollout. An episode is a small state machine driven by the rollout: it gives
the opening chat messages, then takes the assistant's text each turn and answers with an
``Outcome`` — either the episode is done (with its reward) or the env replies with tool
messages and the model gets another turn.

Episodes run plain Python between turns (no I/O of their own for the built-in envs); a user
episode may make ``step`` a coroutine function, the rollout awaits it.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any, Awaitable, Protocol, runtime_checkable

import msgspec

from clora.errors import EnvError

__all__ = [
    "Problem",
    "Outcome",
    "Episode",
    "Env",
    "check_reward",
    "problem_id",
    "answers_match",
    "parse_number",
]


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """One task with a known answer. ``answer`` is canonical text, e.g. ``"84"`` or ``"2.5"``. ``kind``
    (optional) names the sort of problem, e.g. the operation it needs: held-out scores count right
    answers per kind, so a policy that solves only one sort shows as such."""

    id: str
    question: str
    answer: str
    kind: str = ""


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one assistant turn led to.

    ``done``: the episode is over and ``reward`` is final. Otherwise ``tool_messages`` (chat
    messages, e.g. ``{"role": "tool", "content": "19"}``) are shown to the model before its next
    turn. ``info`` explains what happened (e.g. ``{"error": "no tool call"}``); plain data only.
    """

    done: bool
    reward: float = 0.0
    tool_messages: list[dict[str, str]] = []
    info: dict[str, Any] = {}


@runtime_checkable
class Episode(Protocol):
    """One rollout of one problem. Not shared between rollouts."""

    problem: Problem

    def initial_messages(self) -> list[dict[str, str]]:
        """The opening chat messages (system + user)."""
        ...

    def step(self, assistant_text: str) -> Outcome | Awaitable[Outcome]:
        """Score or answer one assistant turn. Model garbage must not raise: it is an Outcome."""
        ...


@runtime_checkable
class Env(Protocol):
    """A source of problems and episodes."""

    name: str
    stop_sequences: tuple[str, ...]  # sampling stop strings that end an assistant turn

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        """``n`` training problems drawn with ``rng``; never one of ``held_out()``."""
        ...

    def held_out(self) -> list[Problem]:
        """The fixed evaluation split: the same list on every call and every run."""
        ...

    def start(self, problem: Problem) -> Episode:
        ...


def problem_id(prefix: str, question: str) -> str:
    """A stable id from the question text (same text, same id, in every run)."""
    digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}"


def check_reward(value: Any, problem: Problem | str = "?") -> float:
    """A reward must be a finite real number; anything else is a bug in the env."""
    pid = problem.id if isinstance(problem, Problem) else problem
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EnvError(f"env returned reward {value!r} ({type(value).__name__}) for problem {pid}: "
                       "a reward must be a finite number")
    reward = float(value)
    if not math.isfinite(reward):
        raise EnvError(f"env returned non-finite reward {reward!r} for problem {pid}")
    return reward


def parse_number(text: str) -> float | None:
    """A number written by a person or a model: ``'1,234'``, ``'$12.50'``, ``'-3'``, ``'7 apples'``.

    Returns ``None`` when the text does not start with a number (an expression like ``'3+4'``
    is not a number).
    """
    match = re.fullmatch(
        r"\s*\$?\s*(-?\s*(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?)\s*(?:[A-Za-z%][A-Za-z%\s]*)?\.?\s*",
        text,
    )
    if match is None:
        return None
    digits = match.group(1).replace(",", "").replace(" ", "")
    if not digits or digits in ("-", ".", "-."):
        return None
    try:
        value = float(digits)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(given: float, expected: float, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Numeric comparison with a small tolerance (``2.5000001`` matches ``2.5``)."""
    return math.isclose(given, expected, rel_tol=rel_tol, abs_tol=abs_tol)
