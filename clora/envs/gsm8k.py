"""GSM8K-style problems from a jsonl file, solved with the Calculator + Final Answer tools.

Each non-blank line is a JSON object with ``"question"`` (text) and ``"answer"``: either GSM8K's
worked solution ending in ``#### <number>`` or a plain number. The held-out split is fixed by
a hash of each question (independent of file order and of any seed): the ``held_out_size``
questions with the smallest hashes, at most half of the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

from clora.envs.base import Episode, Problem, parse_number, problem_id
from clora.envs.calculator import format_number
from clora.envs.tools import TOOL_STOP_SEQUENCES, ExampleStyle, ToolUseEpisode, tool_system_prompt, worked_examples
from clora.errors import ConfigError

__all__ = ["load_jsonl_problems", "parse_answer", "Gsm8kEnv"]


def parse_answer(answer: object) -> str | None:
    """Canonical answer text from ``'... #### 1,234'``, ``'1234'`` or ``1234``; ``None`` if not a number."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        value = float(answer) if math.isfinite(answer) else None
    elif isinstance(answer, str):
        tail = answer.rsplit("####", 1)[-1] if "####" in answer else answer
        value = parse_number(tail)
    else:
        return None
    return None if value is None else format_number(value)


def load_jsonl_problems(path: str | Path) -> list[Problem]:
    """Every problem in a jsonl file; a bad file raises ``ConfigError`` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"env.path: problem file {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    problems: list[Problem] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object with 'question' and 'answer'")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: 'question' must be non-empty text")
        if "answer" not in record:
            raise ConfigError(f"{where}: missing 'answer'")
        answer = parse_answer(record["answer"])
        if answer is None:
            raise ConfigError(
                f"{where}: 'answer' must be a number or end with '#### <number>', got {record['answer']!r:.80}"
            )
        question = question.strip()
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(id=problem_id("gsm8k", question), question=question, answer=answer))
    if not problems:
        raise ConfigError(f"{p}: no problems (the file is empty)")
    return problems


def _split_key(problem: Problem) -> str:
    return hashlib.sha256(problem.question.encode("utf-8")).hexdigest()


class Gsm8kEnv:
    """Tool-use env over problems loaded from a GSM8K-style jsonl file."""

    name = "gsm8k"
    stop_sequences = TOOL_STOP_SEQUENCES

    def __init__(
        self, problems: list[Problem], *, held_out_size: int = 32, tool_role: str = "tool",
        examples: ExampleStyle = "each_op",
    ):
        if len(problems) < 2:
            raise ConfigError(f"gsm8k env needs at least 2 problems (train and held-out), got {len(problems)}")
        ranked = sorted(problems, key=_split_key)
        n_held = min(held_out_size, len(problems) // 2)
        self._held_out = ranked[:n_held]
        held_ids = {p.id for p in self._held_out}
        self._train = [p for p in problems if p.id not in held_ids]
        self._tool_role = tool_role
        self.examples = worked_examples(examples, None)  # multi-step stories
        self._system_prompt = tool_system_prompt(examples)

    @classmethod
    def from_file(
        cls, path: str | Path, *, held_out_size: int = 32, tool_role: str = "tool", examples: ExampleStyle = "each_op"
    ) -> "Gsm8kEnv":
        return cls(load_jsonl_problems(path), held_out_size=held_out_size, tool_role=tool_role, examples=examples)

    def held_out(self) -> list[Problem]:
        return list(self._held_out)

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        if n <= len(self._train):
            return rng.sample(self._train, n)
        return rng.choices(self._train, k=n)

    def start(self, problem: Problem) -> Episode:
        return ToolUseEpisode(
            problem, tool_role=self._tool_role, system_prompt=self._system_prompt, examples=self.examples
        )
