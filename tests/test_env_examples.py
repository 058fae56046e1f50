"""Worked examples of the tool-use envs: they cover every operation of the task, they are right, and
every problem of an env opens with the same prompt (a shared prefix)."""

from __future__ import annotations

import random
import re

import pytest

from clora.config import EnvConfig, ExperimentConfig, decode_config
from clora.envs import (
    TOOL_INSTRUCTIONS,
    TOOL_SYSTEM_PROMPT,
    ArithmeticEnv,
    Gsm8kEnv,
    Problem,
    ToolUseEpisode,
    format_number,
    make_env,
    parse_tool_call,
    worked_examples,
)
from clora.envs import evaluate as calculate
from clora.errors import ConfigError

# The arithmetic env's question templates (clora/envs/arithmetic.py), one per operation.
OPERATION_OF_QUESTION = {
    r"and buys \d+ more": "+",
    r"and gives \d+ to a friend": "-",
    r"boxes with \d+ \w+ in each box": "*",
    r"equally among \d+ friends": "/",
}


def _operation(question: str) -> str:
    (op,) = [op for pattern, op in OPERATION_OF_QUESTION.items() if re.search(pattern, question)]
    return op


def _example_operations(messages: list[dict[str, str]]) -> set[str]:
    """The operators of every Calculator call the worked examples (assistant turns before the question) make."""
    ops: set[str] = set()
    for m in messages[:-1]:
        call = parse_tool_call(m["content"]) if m["role"] == "assistant" else None
        if call is not None and call.name == "Calculator":
            ops |= set(re.findall(r"[-+*/]", call.args))
    return ops


def test_difficulty_1_draws_all_four_operations_in_training_and_held_out():
    env = ArithmeticEnv(difficulty=1, seed=0, held_out_size=64)
    held = {_operation(p.question) for p in env.held_out()}
    train = {_operation(p.question) for p in env.train_problems(random.Random(0), 64)}
    assert held == train == {"+", "-", "*", "/"}


@pytest.mark.parametrize(("difficulty", "operations"), [(0, {"+", "-"}), (1, {"+", "-", "*", "/"}),
                                                        (2, {"+", "-", "*", "/"}), (3, {"+", "-", "*", "/"})])
def test_the_default_prompt_shows_every_operation_of_the_difficulty(difficulty, operations):
    env = make_env(EnvConfig(difficulty=difficulty, held_out_size=8))
    problem = env.held_out()[0]
    messages = env.start(problem).initial_messages()
    assert _example_operations(messages) == operations
    assert messages[-1] == {"role": "user", "content": problem.question}
    assert messages[0] == {"role": "system", "content": TOOL_INSTRUCTIONS}


def test_every_problem_of_an_env_shares_the_prompt_up_to_its_question():
    env = ArithmeticEnv(difficulty=1, seed=3, held_out_size=16)
    problems = env.held_out() + env.train_problems(random.Random(1), 16)
    prefixes = {repr(env.start(p).initial_messages()[:-1]) for p in problems}
    assert len(prefixes) == 1
    assert repr(ArithmeticEnv(difficulty=1, seed=9).start(problems[0]).initial_messages()[:-1]) in prefixes


def test_the_addition_style_reproduces_the_old_prompt_and_none_has_no_examples():
    problem = ArithmeticEnv(difficulty=0).held_out()[0]
    old = make_env(EnvConfig(difficulty=0, examples="addition")).start(problem).initial_messages()
    assert old[0]["content"] == TOOL_SYSTEM_PROMPT and [m["content"] for m in old[1:5]] == [
        "Lily has 15 shells and finds 9 more. How many shells does Lily have now?",
        "<tool>Calculator: 15+9</tool>", "24", "<tool>Final Answer: 24</tool>",
    ]
    assert _example_operations(old) == {"+"}
    bare = make_env(EnvConfig(difficulty=0, examples="none")).start(problem).initial_messages()
    assert [m["role"] for m in bare] == ["system", "user"]
    allowed = "use one of 'addition', 'each_op', 'none'"
    with pytest.raises(ConfigError, match=rf"env.examples: invalid value 'all'; {allowed}"):
        decode_config('name = "x"\nenv = { examples = "all" }', type_=ExperimentConfig)


@pytest.mark.parametrize("difficulty", [0, 1, 2, None])
def test_every_worked_example_is_right(difficulty):
    for example in worked_examples("each_op", difficulty):
        assert format_number(calculate(example.expression)) == example.result
        episode = ToolUseEpisode(Problem(id="x", question=example.question, answer=example.result))
        call, result, answer = (m["content"] for m in example.messages()[1:])
        assert episode.step(call).tool_messages[0]["content"] == result
        assert episode.step(answer).reward == 1.0


def test_gsm8k_env_opens_with_the_multi_step_stories(tmp_path):
    problems = [Problem(id=f"g{i}", question=f"q{i}", answer=str(i)) for i in range(6)]
    env = Gsm8kEnv(problems, held_out_size=2)
    messages = env.start(problems[0]).initial_messages()
    assert _example_operations(messages) == {"+", "-", "*", "/"}
    assert sum(1 for m in messages if m["role"] == "assistant" and "Calculator" in m["content"]) == 2
