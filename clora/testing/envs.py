"""ToyEnv: a one-turn env for tests, scored by a function of the answer's text.

Any answer ends the episode. With ``parity_reward`` (the default) an untrained model earns a coin
flip per answer: groups have spread, advantages are non-zero, every tenant trains, and the reward
is still learnable. ``char_sum_reward`` is graded, so a group's rewards almost never tie.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from clora.envs import Outcome, Problem

__all__ = ["ToyEnv", "ToyEpisode", "parity_reward", "char_sum_reward"]


def parity_reward(text: str) -> float:
    """1.0 when ``text`` has an even number of characters, else 0.0."""
    return float(len(text) % 2 == 0)


def char_sum_reward(text: str) -> float:
    """(sum of the code points of ``text``) mod 13, over 13: a graded reward in [0, 1)."""
    return (sum(map(ord, text)) % 13) / 13


class ToyEpisode:
    """One problem: the user asks the question; the first answer ends the episode."""

    def __init__(self, problem: Problem, reward: Callable[[str], float], fail: bool = False) -> None:
        self.problem = problem
        self._reward = reward
        self._fail = fail

    def initial_messages(self) -> list[dict[str, str]]:
        """The question as one user message."""
        return [{"role": "user", "content": self.problem.question}]

    def step(self, assistant_text: str) -> Outcome:
        """Done, with the reward of ``assistant_text`` and its length as ``info["chars"]``."""
        if self._fail:
            raise RuntimeError("this env is broken on purpose")
        return Outcome(done=True, reward=self._reward(assistant_text), info={"chars": len(assistant_text)})


class ToyEnv:
    """Training problems ``p<k>`` asking ``question`` (``{k}`` filled in, k drawn from the tenant's rng);
    held-out problems ``h0``, ``h1``, ... asking "say <k>".

    ``drawn`` lists the ids of every batch of training problems handed out, ``started`` counts the
    episodes started. ``fail_after``: every episode after that many raises in ``step`` (an env bug,
    for fault-isolation tests).
    """

    name = "toy"
    stop_sequences: tuple[str, ...] = ()

    def __init__(
        self,
        reward: Callable[[str], float] = parity_reward,
        *,
        question: str = "count to {k}",
        held_out: int = 2,
        fail_after: int | None = None,
    ) -> None:
        self.reward = reward
        self.question = question
        self.held_out_size = held_out
        self.fail_after = fail_after
        self.drawn: list[list[str]] = []
        self.started = 0

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        """``n`` problems drawn with ``rng`` (recorded in ``drawn``)."""
        problems = [Problem(id=f"p{k}", question=self.question.format(k=k), answer="0")
                    for k in (rng.randrange(1000) for _ in range(n))]
        self.drawn.append([p.id for p in problems])
        return problems

    def held_out(self) -> list[Problem]:
        """The fixed evaluation problems."""
        return [Problem(id=f"h{k}", question=f"say {k}", answer="0") for k in range(self.held_out_size)]

    def start(self, problem: Problem) -> ToyEpisode:
        """A fresh episode (broken after ``fail_after`` starts)."""
        self.started += 1
        return ToyEpisode(problem, self.reward, fail=self.fail_after is not None and self.started > self.fail_after)
