"""A one-turn env for runtime tests on the tiny model: any text ends the episode with a reward from its characters."""

from __future__ import annotations

import random

from clora.envs import Outcome, Problem


class SmallEpisode:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def initial_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.problem.question}]

    def step(self, text: str) -> Outcome:
        return Outcome(done=True, reward=(sum(map(ord, text)) % 13) / 13)


class SmallEnv:
    name = "small"
    stop_sequences: tuple[str, ...] = ()

    def __init__(self, question: str = "go") -> None:
        self.question = question

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        return [Problem(id=f"p{rng.randrange(1000)}", question=self.question, answer="0") for _ in range(n)]

    def held_out(self) -> list[Problem]:
        return [Problem(id="h", question="hi", answer="0")]

    def start(self, problem: Problem) -> SmallEpisode:
        return SmallEpisode(problem)
