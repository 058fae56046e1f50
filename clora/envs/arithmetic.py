"""Procedural arithmetic word problems with known answers, solved by tool use.

Difficulty sets the structure:

- 0: one operation (+ or -), numbers 1-10
- 1: one operation (+ - * /), numbers up to 99 (division always exact)
- d >= 2: a story of d operations applied in order to a starting amount

Every answer is a non-negative integer. The held-out split comes from its own seed stream
(fixed by ``seed`` and ``difficulty``) and training problems are never equal to a held-out
problem (compared by question text).
"""

from __future__ import annotations

import random

from clora.envs.base import Episode, Problem, problem_id
from clora.envs.single_turn import SingleTurnEpisode
from clora.envs.tools import TOOL_STOP_SEQUENCES, ExampleStyle, ToolUseEpisode, tool_system_prompt, worked_examples
from clora.errors import EnvError

__all__ = ["ArithmeticEnv", "generate_problem"]

_NAMES = ("Tom", "Ana", "Lee", "Maya", "Sam", "Noor", "Ivan", "Zoe", "Omar", "Lena", "Kai", "Rosa")
_ITEMS = ("apple", "marble", "book", "coin", "card", "pencil", "sticker", "shell", "cookie", "stamp")

_MAX_TRIES = 10_000


_OP_KINDS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}
"""A one-operation problem's ``Problem.kind``: the operation its answer needs."""


def _one_op(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if difficulty == 0:
        op, hi = rng.choice("+-"), 10
    else:
        op, hi = rng.choice("+-*/"), 99
    if op == "+":
        a, b = rng.randint(2, hi), rng.randint(1, hi)
        return (f"{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?", a + b, op)
    if op == "-":
        a = rng.randint(2, hi)
        b = rng.randint(1, a - 1)
        return (f"{name} has {a} {item}s and gives {b} to a friend. How many {item}s does {name} have left?", a - b, op)
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, hi)
        return (f"{name} buys {a} boxes with {b} {item}s in each box. How many {item}s does {name} buy?", a * b, op)
    b = rng.randint(2, 12)
    q = rng.randint(2, max(2, hi // b))
    return (f"{name} shares {b * q} {item}s equally among {b} friends. How many {item}s does each friend get?", q, op)


def _story(rng: random.Random, steps: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(5, 50)
    parts = [f"{name} has {value} {item}s."]
    for _ in range(steps):
        divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
        ops = ["+", "-", "*"] + (["/"] if divisors else [])
        if value < 2:
            ops.remove("-")
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(2, 40)
            value += b
            parts.append(f"Then {name} finds {b} more.")
        elif op == "-":
            b = rng.randint(1, value - 1)
            value -= b
            parts.append(f"Then {name} gives away {b}.")
        elif op == "*":
            b = rng.randint(2, 4)
            value *= b
            parts.append(f"Then {name} ends up with {b} times as many.")
        else:
            b = rng.choice(divisors)
            value //= b
            parts.append(f"Then {name} splits them into {b} equal piles and keeps one pile.")
    parts.append(f"How many {item}s does {name} have now?")
    return " ".join(parts), value


def generate_problem(rng: random.Random, difficulty: int) -> Problem:
    """One problem at ``difficulty`` (>= 0) drawn with ``rng``."""
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    if difficulty <= 1:
        question, answer, op = _one_op(rng, difficulty)
        kind = _OP_KINDS[op]
    else:
        (question, answer), kind = _story(rng, difficulty), f"story{difficulty}"
    return Problem(id=problem_id(f"arith{difficulty}", question), question=question, answer=str(answer), kind=kind)


class ArithmeticEnv:
    """Built-in tool-use env: Calculator + Final Answer over generated word problems.

    ``single_turn=True``: the same problems (training stream and held-out split) answered in one
    turn without the Calculator (clora.envs.single_turn), no stop strings.
    """

    name = "arithmetic"

    def __init__(
        self, *, difficulty: int = 1, seed: int = 0, held_out_size: int = 32, tool_role: str = "tool",
        examples: ExampleStyle = "each_op", single_turn: bool = False,
    ):
        """``examples``: the worked examples every episode opens with (clora.envs.tools.worked_examples)."""
        if difficulty < 0:
            raise ValueError(f"difficulty must be >= 0, got {difficulty}")
        self.difficulty = difficulty
        self.seed = seed
        self.single_turn = single_turn
        self.stop_sequences: tuple[str, ...] = () if single_turn else TOOL_STOP_SEQUENCES
        self._tool_role = tool_role
        self.examples = worked_examples(examples, difficulty)  # the same for every problem: a shared prompt prefix
        self._system_prompt = tool_system_prompt(examples)
        held_rng = random.Random(f"clora-arithmetic-held-out/{seed}/{difficulty}")
        held: dict[str, Problem] = {}
        for _ in range(_MAX_TRIES):
            if len(held) >= held_out_size:
                break
            p = generate_problem(held_rng, difficulty)
            held.setdefault(p.question, p)
        self._held_out = list(held.values())
        self._held_questions = frozenset(held)

    def held_out(self) -> list[Problem]:
        return list(self._held_out)

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        out: list[Problem] = []
        for _ in range(_MAX_TRIES * max(1, n)):
            if len(out) >= n:
                return out
            p = generate_problem(rng, self.difficulty)
            if p.question not in self._held_questions:
                out.append(p)
        raise EnvError(f"arithmetic env: could not draw {n} training problems outside the held-out split")

    def start(self, problem: Problem) -> Episode:
        if self.single_turn:
            return SingleTurnEpisode(problem, examples=self.examples)
        return ToolUseEpisode(
            problem, tool_role=self._tool_role, system_prompt=self._system_prompt, examples=self.examples
        )
