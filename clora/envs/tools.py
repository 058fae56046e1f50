"""The tool-call text format and the Calculator + Final Answer episode.

Format (one call per assistant turn; the first call in the text counts, the rest is ignored)::

    <tool>Calculator: (12+7)*3</tool>
    <tool>Final Answer: 57</tool>

Parsing is tolerant: case and spaces do not matter (``< TOOL > calculator : 3*4 </Tool>``),
``=`` may stand for ``:``, ``final_answer``/``answer`` name the Final Answer tool, and a
missing ``</tool>`` at the end of the text is accepted (a sampler stop string may cut it).

Worked examples (``WorkedExample``) open every episode as real chat turns (question, Calculator
call, result, Final Answer): a small model copies turns far more readily than it follows
instructions, so it copies whatever operation the examples show. ``worked_examples`` picks a
fixed set per env: by default ("each_op") examples that together use every operation of the
task, so copying an example's operator never solves the task.
"""

from __future__ import annotations

import re

import msgspec

from collections.abc import Sequence
from clora.config import ExampleStyle
from clora.envs.base import Outcome, Problem, answers_match, parse_number
from clora.envs.calculator import CalculatorError, evaluate, format_number

__all__ = [
    "ToolCall",
    "parse_tool_call",
    "known_tool_call",
    "TOOL_STOP_SEQUENCES",
    "TOOL_SYSTEM_PROMPT",
    "TOOL_INSTRUCTIONS",
    "ExampleStyle",
    "WorkedExample",
    "ADDITION_EXAMPLE",
    "worked_examples",
    "tool_system_prompt",
    "ToolUseEpisode",
    "CALCULATOR",
    "FINAL_ANSWER",
    "few_shot_messages",
    "final_answer_outcome",
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

TOOL_INSTRUCTIONS = """\
You solve math word problems with tools. Call a tool by writing one line:
<tool>Calculator: EXPRESSION</tool> computes numbers with + - * / and parentheses.
<tool>Final Answer: NUMBER</tool> gives your answer and ends the task.
Call one tool per turn, then stop and wait for the result."""
"""The system prompt: the tool format, no example (the worked examples follow as chat turns)."""

TOOL_SYSTEM_PROMPT = TOOL_INSTRUCTIONS + """
Example:
Question: Tom has 12 apples and buys 7 more. How many apples does he have?
You: <tool>Calculator: 12+7</tool>
Result: 19
You: <tool>Final Answer: 19</tool>"""
"""The system prompt of the "addition" example style: the instructions and one addition example."""


class WorkedExample(msgspec.Struct, frozen=True):
    """A solved problem: one Calculator call of ``expression``, its ``result``, the Final Answer."""

    question: str
    expression: str
    result: str

    def messages(self, tool_role: str = "tool") -> list[dict[str, str]]:
        """The example as chat turns: question, Calculator call, tool result, Final Answer."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": f"<tool>{CALCULATOR}: {self.expression}</tool>"},
            {"role": tool_role, "content": self.result},
            {"role": "assistant", "content": f"<tool>{FINAL_ANSWER}: {self.result}</tool>"},
        ]


ADDITION_EXAMPLE = WorkedExample(
    "Lily has 15 shells and finds 9 more. How many shells does Lily have now?", "15+9", "24"
)
_SUBTRACTION = WorkedExample(
    "Ben has 31 stamps and gives 14 to a friend. How many stamps does Ben have left?", "31-14", "17"
)
_MULTIPLICATION = WorkedExample("Mia buys 6 bags with 8 beads in each bag. How many beads does Mia buy?", "6*8", "48")
_DIVISION = WorkedExample(
    "Leo shares 42 grapes equally among 7 friends. How many grapes does each friend get?", "42/7", "6"
)
_STORIES = (
    WorkedExample(
        "Ivy has 14 cards. Then Ivy finds 6 more. Then Ivy ends up with 3 times as many. How many cards does Ivy "
        "have now?", "(14+6)*3", "60",
    ),
    WorkedExample(
        "Max has 30 coins. Then Max gives away 6. Then Max splits them into 4 equal piles and keeps one pile. How "
        "many coins does Max have now?", "(30-6)/4", "6",
    ),
)


def worked_examples(style: ExampleStyle = "each_op", difficulty: int | None = 1) -> tuple[WorkedExample, ...]:
    """The fixed worked examples of an env (the same for every problem, so every prompt shares them).

    "each_op": difficulty 0 (+, -) an addition and a subtraction; difficulty 1 one example of each of
    + - * /; difficulty >= 2 and ``None`` (multi-step stories, e.g. GSM8K) two stories whose single
    Calculator calls, ``(14+6)*3`` and ``(30-6)/4``, use all four. "addition": the addition example
    only. "none": no example.
    """
    if style == "none":
        return ()
    if style == "addition":
        return (ADDITION_EXAMPLE,)
    if style != "each_op":
        raise ValueError(f"unknown worked-example style {style!r}; use 'each_op', 'addition' or 'none'")
    if difficulty == 0:
        return (ADDITION_EXAMPLE, _SUBTRACTION)
    if difficulty == 1:
        return (ADDITION_EXAMPLE, _SUBTRACTION, _MULTIPLICATION, _DIVISION)
    return _STORIES


def tool_system_prompt(style: ExampleStyle = "each_op") -> str:
    """The system prompt that goes with an example style: "addition" keeps its old prompt (which has
    an addition example of its own), the others give the instructions alone."""
    return TOOL_SYSTEM_PROMPT if style == "addition" else TOOL_INSTRUCTIONS


def few_shot_messages(
    tool_role: str = "tool", examples: Sequence[WorkedExample] | None = None
) -> list[dict[str, str]]:
    """Worked examples as real chat turns (default: one of each of + - * /)."""
    chosen = worked_examples("each_op", 1) if examples is None else examples
    return [message for example in chosen for message in example.messages(tool_role)]


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


def known_tool_call(assistant_text: str) -> ToolCall | Outcome:
    """The known tool called in an assistant turn, or the Outcome that ends the episode with reward 0
    when the turn calls no tool or an unknown one."""
    call = parse_tool_call(assistant_text)
    if call is None:
        return Outcome(done=True, reward=0.0, info={"error": "no tool call"})
    if not call.known:
        return Outcome(done=True, reward=0.0, info={"error": f"unknown tool {call.name!r}"})
    return call


class ToolUseEpisode:
    """One problem solved by Calculator calls and one Final Answer; reward 1.0 only if right."""

    def __init__(
        self,
        problem: Problem,
        *,
        system_prompt: str | None = None,
        tool_role: str = "tool",
        few_shot: bool = True,
        examples: Sequence[WorkedExample] | None = None,
    ):
        """``examples``: the worked examples shown before the question (default: one of each of
        + - * /); ``few_shot=False`` shows none. ``system_prompt``: default ``TOOL_INSTRUCTIONS``."""
        self.problem = problem
        self._examples = tuple(examples) if examples is not None else worked_examples("each_op", 1)
        self._few_shot = few_shot
        self._system_prompt = TOOL_INSTRUCTIONS if system_prompt is None else system_prompt
        self._tool_role = tool_role
        expected = parse_number(problem.answer)
        if expected is None:
            raise ValueError(f"problem {problem.id}: answer {problem.answer!r} is not a number")
        self._expected = expected
        self.calculator_calls = 0

    def initial_messages(self) -> list[dict[str, str]]:
        shots = few_shot_messages(self._tool_role, self._examples) if self._few_shot else []
        return [
            {"role": "system", "content": self._system_prompt},
            *shots,
            {"role": "user", "content": self.problem.question},
        ]

    def _reply(self, content: str) -> list[dict[str, str]]:
        return [{"role": self._tool_role, "content": content}]

    def step(self, assistant_text: str) -> Outcome:
        call = known_tool_call(assistant_text)
        if isinstance(call, Outcome):
            return call
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
        return final_answer_outcome(call.args, self._expected, self.problem)


def final_answer_outcome(args: str, expected: float, problem: Problem) -> Outcome:
    """The reward rule of a Final Answer call with ``args``: 1.0 only if it is the expected number."""
    given = parse_number(args)
    if given is None:
        return Outcome(done=True, reward=0.0, info={"error": "final answer is not a number", "given": args})
    correct = answers_match(given, expected)
    return Outcome(
        done=True,
        reward=1.0 if correct else 0.0,
        info={"given": format_number(given), "expected": problem.answer, "correct": correct},
    )
