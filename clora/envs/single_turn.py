"""The single-turn variant of the tool-use task: the answer in one assistant turn, no Calculator.

The same problems and the same reward rule as ``ToolUseEpisode`` (1.0 only when the first tool
call in the text is a Final Answer with the right number), but the model answers in its first
turn::

    <tool>Final Answer: 57</tool>

The episode ends after that one turn whatever the text is, and the env has no stop strings: the
turn ends at the end-of-turn token or at ``max_tokens``. That is what a single-turn RL trainer
without tool calls or stop strings (TRL's ``GRPOTrainer`` with ``transformers.generate``) can run
too, so the two do the same work (docs/benchmarks.md). The worked examples are the multi-turn
env's examples answered directly: question, then the Final Answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from clora.envs.base import Outcome, Problem, parse_number
from clora.envs.tools import CALCULATOR, FINAL_ANSWER, WorkedExample, final_answer_outcome, known_tool_call

__all__ = ["SINGLE_TURN_INSTRUCTIONS", "SingleTurnEpisode", "answer_messages"]

SINGLE_TURN_INSTRUCTIONS = f"""\
You solve math word problems. Work out the answer yourself and give it in one line:
<tool>{FINAL_ANSWER}: NUMBER</tool>"""
"""The system prompt of the single-turn variant."""


def answer_messages(examples: Sequence[WorkedExample]) -> list[dict[str, str]]:
    """Worked examples answered in one turn: the question, then the Final Answer call."""
    return [message for example in examples for message in (
        {"role": "user", "content": example.question},
        {"role": "assistant", "content": f"<tool>{FINAL_ANSWER}: {example.result}</tool>"},
    )]


class SingleTurnEpisode:
    """One problem answered in one turn; reward 1.0 only if the Final Answer is right."""

    def __init__(self, problem: Problem, *, examples: Sequence[WorkedExample] = (),
                 system_prompt: str = SINGLE_TURN_INSTRUCTIONS):
        self.problem = problem
        self._examples = tuple(examples)
        self._system_prompt = system_prompt
        expected = parse_number(problem.answer)
        if expected is None:
            raise ValueError(f"problem {problem.id}: answer {problem.answer!r} is not a number")
        self._expected = expected

    def initial_messages(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self._system_prompt},
            *answer_messages(self._examples),
            {"role": "user", "content": self.problem.question},
        ]

    def step(self, assistant_text: str) -> Outcome:
        call = known_tool_call(assistant_text)
        if isinstance(call, Outcome):
            return call
        if call.name == CALCULATOR:
            return Outcome(done=True, reward=0.0, info={"error": "no Calculator in the single-turn task"})
        return final_answer_outcome(call.args, self._expected, self.problem)
