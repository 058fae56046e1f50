"""The tool-call text format and the Calculator + Final Answer episode.

Format (one call per assistant turn; the first call in the text counts, the rest is ignored)::

    <tool>Calculator: (12+7)*3</tool>
    <tool>Final Answer: 57</tool>

Parsing is tolerant: case and spaces do not matter (``< TOOL > calculator : 3*4 </Tool>``),
``=`` may stand for ``:``, ``final_answer``/``answer`` name the Final Answer tool, and a
missing ``</tool>`` at the end of the text is accepted (a sampler stop string may cut it).
"""

from __future__ import annotations

import re

import msgspec

from clora.envs.base import Outcome, Problem, answers_match, parse_number
from clora.envs.calculator import CalculatorError, evaluate, format_number

__all__ = [
    "ToolCall",
    "parse_tool_call",
    "TOOL_STOP_SEQUENCES",
    "TOOL_SYSTEM_PROMPT",
    "ToolUseEpisode",
    "CALCULATOR",
    "FINAL_ANSWER",
    "few_shot_messages",
]

CALCULATOR = "Calculator"
FINAL_ANSWER = "Final Answer"
TOOL_STOP_SEQUENCES: tuple[str, ...] = ("</tool>",)

_TOOL_NAMES = {
    "calculator": CALCULATOR,
    "calc": CALCULATOR,
    "finalanswer": FINAL_ANSWER,
    "final": FINAL_ANSWER,
    "answer": FINAL_ANSWER,
}

_TOOL_CALL = re.compile(
    r"<\s*tool\s*>\s*(?P<name>[A-Za-z_ ]+?)\s*[:=]\s*(?P<args>.*?)\s*(?:<\s*/\s*tool\s*>|$)",
    re.IGNORECASE | re.DOTALL,
)

TOOL_SYSTEM_PROMPT = """\
You solve math word problems with tools. Call a tool by writing one line:
<tool>Calculator: EXPRESSION</tool> computes numbers with + - * / and parentheses.
<tool>Final Answer: NUMBER</tool> gives your answer and ends the task.
Call one tool per turn, then stop and wait for the result.
Example:
Question: Tom has 12 apples and buys 7 more. How many apples does he have?
You: <tool>Calculator: 12+7</tool>
Result: 19
You: <tool>Final Answer: 19</tool>"""


FEW_SHOT_QUESTION = "Lily has 15 shells and finds 9 more. How many shells does Lily have now?"
FEW_SHOT_TURNS = ("<tool>Calculator: 15+9</tool>", "24", "<tool>Final Answer: 24</tool>")


def few_shot_messages(tool_role: str = "tool") -> list[dict[str, str]]:
    """One solved example as real chat turns (a small model copies turns better than instructions)."""
    call, result, answer = FEW_SHOT_TURNS
    return [
        {"role": "user", "content": FEW_SHOT_QUESTION},
        {"role": "assistant", "content": call},
        {"role": tool_role, "content": result},
        {"role": "assistant", "content": answer},
    ]


class ToolCall(msgspec.Struct, frozen=True):
    """A parsed call: ``name`` is canonical (``CALCULATOR``/``FINAL_ANSWER``) or the raw unknown name."""

    name: str
    args: str
    known: bool


def parse_tool_call(text: str) -> ToolCall | None:
    """The first tool call in ``text``, or ``None`` when there is none."""
    match = _TOOL_CALL.search(text or "")
    if match is None:
        return None
    raw_name = match.group("name").strip()
    key = re.sub(r"[\s_]+", "", raw_name).lower()
    canonical = _TOOL_NAMES.get(key)
    args = match.group("args").strip()
    if canonical is None:
        return ToolCall(raw_name, args, False)
    return ToolCall(canonical, args, True)


class ToolUseEpisode:
    """One problem solved by Calculator calls and one Final Answer; reward 1.0 only if right."""

    def __init__(
        self,
        problem: Problem,
        *,
        system_prompt: str = TOOL_SYSTEM_PROMPT,
        tool_role: str = "tool",
        few_shot: bool = True,
    ):
        self.problem = problem
        self._few_shot = few_shot
        self._system_prompt = system_prompt
        self._tool_role = tool_role
        expected = parse_number(problem.answer)
        if expected is None:
            raise ValueError(f"problem {problem.id}: answer {problem.answer!r} is not a number")
        self._expected = expected
        self.calculator_calls = 0

    def initial_messages(self) -> list[dict[str, str]]:
        shots = few_shot_messages(self._tool_role) if self._few_shot else []
        return [
            {"role": "system", "content": self._system_prompt},
            *shots,
            {"role": "user", "content": self.problem.question},
        ]

    def _reply(self, content: str) -> list[dict[str, str]]:
        return [{"role": self._tool_role, "content": content}]

    def step(self, assistant_text: str) -> Outcome:
        call = parse_tool_call(assistant_text)
        if call is None:
            return Outcome(done=True, reward=0.0, info={"error": "no tool call"})
        if not call.known:
            return Outcome(done=True, reward=0.0, info={"error": f"unknown tool {call.name!r}"})
        if call.name == CALCULATOR:
            self.calculator_calls += 1
            try:
                result = format_number(evaluate(call.args))
            except CalculatorError as e:
                return Outcome(
                    done=False,
                    tool_messages=self._reply(f"Error: {e}"),
                    info={"tool": CALCULATOR, "error": str(e)},
                )
            return Outcome(done=False, tool_messages=self._reply(result), info={"tool": CALCULATOR, "result": result})
        given = parse_number(call.args)
        if given is None:
            return Outcome(done=True, reward=0.0, info={"error": "final answer is not a number", "given": call.args})
        correct = answers_match(given, self._expected)
        return Outcome(
            done=True,
            reward=1.0 if correct else 0.0,
            info={"given": format_number(given), "expected": self.problem.answer, "correct": correct},
        )
