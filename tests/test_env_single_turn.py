"""The single-turn variant of the arithmetic task: same problems, one turn, same reward rule."""

from __future__ import annotations

import random

import pytest

from clora.config import EnvConfig
from clora.envs import ArithmeticEnv, SingleTurnEpisode, ToolUseEpisode, make_env
from clora.envs.tools import TOOL_STOP_SEQUENCES
from clora.errors import ConfigError


@pytest.mark.parametrize("difficulty", [0, 1, 3])
def test_same_held_out_and_training_problems_as_the_multi_turn_env(difficulty):
    multi = ArithmeticEnv(difficulty=difficulty, seed=7, held_out_size=16)
    single = ArithmeticEnv(difficulty=difficulty, seed=7, held_out_size=16, single_turn=True)
    assert single.held_out() == multi.held_out()
    rng_a, rng_b = random.Random(3), random.Random(3)
    for _ in range(3):
        assert single.train_problems(rng_a, 4) == multi.train_problems(rng_b, 4)


def test_single_turn_episode_answers_in_one_turn_with_the_multi_turn_reward_rule():
    env = ArithmeticEnv(difficulty=0, seed=7, held_out_size=8, single_turn=True)
    multi = ArithmeticEnv(difficulty=0, seed=7, held_out_size=8)
    problem = env.held_out()[0]
    right, wrong = problem.answer, str(int(problem.answer) + 1)
    cases = {
        f"<tool>Final Answer: {right}</tool>": 1.0,
        f"< TOOL > final_answer = {right}": 1.0,  # tolerant parse, cut before </tool>
        f"The answer is {right}.": 0.0,  # no tool call
        f"<tool>Final Answer: {wrong}</tool>": 0.0,
        "<tool>Final Answer: many</tool>": 0.0,
        "<tool>Search: apples</tool>": 0.0,
        f"<tool>Final Answer: {wrong}</tool> <tool>Final Answer: {right}</tool>": 0.0,  # the first call counts
    }
    for text, reward in cases.items():
        outcome = env.start(problem).step(text)
        assert outcome.done and outcome.reward == reward, text
        if "Final Answer" in text:  # the same rule as the multi-turn episode's Final Answer
            assert multi.start(problem).step(text).reward == reward, text


def test_a_calculator_call_ends_the_single_turn_episode_unrewarded():
    env = ArithmeticEnv(difficulty=0, seed=7, held_out_size=4, single_turn=True)
    problem = env.held_out()[0]
    outcome = env.start(problem).step("<tool>Calculator: 2+3</tool>")
    assert outcome.done and outcome.reward == 0.0 and outcome.tool_messages == []


def test_single_turn_prompt_shows_the_examples_answered_directly_and_no_stop_strings():
    env = make_env(EnvConfig(kind="arithmetic", difficulty=0, held_out_size=4, single_turn=True))
    assert env.stop_sequences == ()
    assert make_env(EnvConfig(kind="arithmetic", difficulty=0, held_out_size=4)).stop_sequences == TOOL_STOP_SEQUENCES
    problem = env.held_out()[0]
    episode = env.start(problem)
    assert isinstance(episode, SingleTurnEpisode)
    messages = episode.initial_messages()
    assert messages[0]["role"] == "system" and "Calculator" not in messages[0]["content"]
    assert messages[-1] == {"role": "user", "content": problem.question}
    shots = messages[1:-1]
    assert [m["role"] for m in shots] == ["user", "assistant"] * 2  # each_op at difficulty 0: + and -
    assert shots[1]["content"] == "<tool>Final Answer: 24</tool>"
    assert not any(m["role"] == "tool" for m in messages)
    assert isinstance(make_env(EnvConfig(kind="arithmetic", held_out_size=4)).start(problem), ToolUseEpisode)


def test_single_turn_is_an_arithmetic_option_only():
    with pytest.raises(ConfigError, match="env.single_turn"):
        EnvConfig(kind="gsm8k", path="x.jsonl", single_turn=True).validate()
