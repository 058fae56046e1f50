"""Environments: safe calculator, tool-call parsing, rewards, problem generation and splits, jsonl loader."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clora.config import EnvConfig
from clora.envs import (
    CALCULATOR,
    FINAL_ANSWER,
    ArithmeticEnv,
    CalculatorError,
    Env,
    Episode,
    Gsm8kEnv,
    Problem,
    ToolUseEpisode,
    check_reward,
    evaluate,
    format_number,
    generate_problem,
    load_jsonl_problems,
    make_env,
    parse_number,
    parse_tool_call,
)
from clora.errors import ConfigError, EnvError

# ----------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("12*7", Fraction(84)),
        ("(12 + 7) * 3", Fraction(57)),
        ("-3 + 10", Fraction(7)),
        ("7/2", Fraction(7, 2)),
        ("1,000 - 1", Fraction(999)),
        ("$12.50 * 2", Fraction(25)),
        ("12 × 3 ÷ 4", Fraction(9)),
        ("8 - -2 =", Fraction(10)),
        ("2*6 = 13", Fraction(12)),
        ("0.1 + 0.2", Fraction(3, 10)),
        ("(" * 90 + "1" + ")" * 90, Fraction(1)),
        ("-" * 190 + "5", Fraction(5)),
    ],
)
def test_calculator_computes_allowed_expressions(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os').system('true')", "Call"),
        ("(1).real", "Attribute"),
        ("x + 1", "Name"),
        ("open", "Name"),
        ("[1, 2][0]", "not allowed"),
        ("2 ** 999999", "Pow"),
        ("9 ** 9 ** 9", "Pow"),
        ("7 // 2", "FloorDiv"),
        ("7 % 2", "Mod"),
        ("1 << 40", "LShift"),
        ("lambda: 1", "Lambda"),
        ("'a' * 3", "not a number"),
        ("True + 1", "not a number"),
        ("1j * 2", "not a number"),
        ("1/0", "division by zero"),
        ("5 / (3 - 3)", "division by zero"),
        ("99999999 * 99999999 * 99999999", "too large"),
        ("1e308 * 10", "too large"),
        ("1e999", "too large"),
        ("1" * 250, "longer than"),
        ("(" * 150 + "1" + ")" * 150, "longer than"),
        ("-" * 199 + "1" + "/0", "longer than"),
        ("", "empty"),
        ("12 +", "cannot parse"),
        ("import os", "cannot parse"),
    ],
)
def test_calculator_refuses_anything_else(expression, reason):
    with pytest.raises(CalculatorError, match=re.escape(reason)):
        evaluate(expression)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_calculator_never_raises_anything_but_calculator_error(text):
    try:
        value = evaluate(text)
    except CalculatorError:
        return
    assert isinstance(value, Fraction) and abs(value) <= 10**15


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-99, 99), min_size=2, max_size=6), st.lists(st.sampled_from("+-*"), min_size=5, max_size=5))
def test_calculator_agrees_with_python_on_integer_arithmetic(numbers, ops):
    expression = str(numbers[0])
    for op, n in zip(ops, numbers[1:]):
        expression += f" {op} ({n})"
    assert evaluate(expression) == eval(expression)  # noqa: S307 - trusted, generated here


def test_format_number_is_canonical():
    assert format_number(Fraction(84)) == "84"
    assert format_number(Fraction(5, 2)) == "2.5"
    assert format_number(Fraction(1, 3)) == "0.3333333333"
    assert format_number(-7.0) == "-7"


# ----------------------------------------------------------------------------- tool calls


@pytest.mark.parametrize(
    ("text", "name", "args"),
    [
        ("<tool>Calculator: 12*7</tool>", CALCULATOR, "12*7"),
        ("I will compute. < TOOL > calculator :  3 * 4  </Tool> then more", CALCULATOR, "3 * 4"),
        ("<tool>Final Answer: 84</tool>", FINAL_ANSWER, "84"),
        ("<tool>final_answer = 84</tool>", FINAL_ANSWER, "84"),
        ("<tool>FINAL ANSWER:84", FINAL_ANSWER, "84"),  # cut by a stop string
        ("<tool>Answer: 9</tool><tool>Calculator: 1+1</tool>", FINAL_ANSWER, "9"),  # first call counts
    ],
)
def test_parse_tool_call_is_tolerant(text, name, args):
    call = parse_tool_call(text)
    assert call is not None and call.known
    assert (call.name, call.args) == (name, args)


@pytest.mark.parametrize("text", ["", "The answer is 84.", "<tool>", "<tool></tool>", "tool: Calculator 3", "<tool>84</tool>"])
def test_parse_tool_call_finds_nothing_in_garbage(text):
    assert parse_tool_call(text) is None


def test_parse_tool_call_reports_unknown_tools():
    call = parse_tool_call("<tool>Search: weather</tool>")
    assert call is not None and not call.known and call.name == "Search"


@pytest.mark.parametrize(
    ("text", "value"),
    [("84", 84.0), ("1,234", 1234.0), ("$12.50", 12.5), ("-3", -3.0), ("7 apples", 7.0), ("19.", 19.0), (".5", 0.5)],
)
def test_parse_number_reads_numbers(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "3+4", "twelve", "12 or 13", "1e999", "-", "apples 7"])
def test_parse_number_refuses_non_numbers(text):
    assert parse_number(text) is None


# ----------------------------------------------------------------------------- episodes and rewards

PROBLEM = Problem(id="p-1", question="Tom has 12 apples and buys 7 more. How many apples does he have?", answer="19")


def test_episode_opens_with_system_and_user_messages():
    messages = ToolUseEpisode(PROBLEM, few_shot=False).initial_messages()
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "<tool>Calculator:" in messages[0]["content"] and "<tool>Final Answer:" in messages[0]["content"]
    assert messages[1]["content"] == PROBLEM.question


def test_few_shot_examples_are_solved_conversations_in_the_tool_format():
    messages = ToolUseEpisode(PROBLEM, tool_role="user").initial_messages()
    shots = messages[1:-1]
    assert messages[0]["role"] == "system" and len(shots) == 16  # one example of each of + - * /
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"] * 4
    assert messages[-1] == {"role": "user", "content": PROBLEM.question}
    for k in range(0, len(shots), 4):  # replaying each example through an episode of its own question earns the reward
        question, call, result, answer = (m["content"] for m in shots[k:k + 4])
        replay = ToolUseEpisode(Problem(id="shot", question=question, answer=result))
        first = replay.step(call)
        assert first.tool_messages[0]["content"] == result
        assert replay.step(answer).reward == 1.0


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ("<tool>Final Answer: 19</tool>", 1.0),
        ("<tool>Final Answer: 19.0000000001</tool>", 1.0),
        ("<tool>Final Answer: 19 apples</tool>", 1.0),
        ("<tool>Final Answer: 20</tool>", 0.0),
        ("<tool>Final Answer: 12+7</tool>", 0.0),
        ("The answer is 19.", 0.0),
        ("<tool>Search: 19</tool>", 0.0),
        ("", 0.0),
    ],
)
def test_single_turn_rewards(text, reward):
    outcome = ToolUseEpisode(PROBLEM).step(text)
    assert outcome.done
    assert outcome.reward == reward
    if reward == 0.0:
        assert outcome.info.get("error") or outcome.info.get("correct") is False


def test_calculator_then_final_answer_earns_reward_over_two_turns():
    episode = ToolUseEpisode(PROBLEM)
    first = episode.step("Let me add. <tool>Calculator: 12 + 7</tool>")
    assert not first.done and first.reward == 0.0
    assert first.tool_messages == [{"role": "tool", "content": "19"}]
    second = episode.step("<tool>Final Answer: 19</tool>")
    assert second.done and second.reward == 1.0 and second.info["correct"] is True


@pytest.mark.parametrize(("expression", "error"), [("1/0", "division by zero"), ("x*2", "Name"), ("9**9**9", "Pow")])
def test_calculator_garbage_becomes_a_tool_error_message(expression, error):
    outcome = ToolUseEpisode(PROBLEM, tool_role="user").step(f"<tool>Calculator: {expression}</tool>")
    assert not outcome.done and outcome.reward == 0.0
    assert outcome.tool_messages[0]["role"] == "user"
    assert outcome.tool_messages[0]["content"].startswith("Error:") and error in outcome.tool_messages[0]["content"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, True, [1.0]])
def test_check_reward_rejects_non_finite_or_non_numbers(bad):
    with pytest.raises(EnvError, match="p-1"):
        check_reward(bad, PROBLEM)


def test_check_reward_passes_numbers():
    assert check_reward(1, PROBLEM) == 1.0 and isinstance(check_reward(1, PROBLEM), float)
    assert check_reward(-0.5, "x") == -0.5


# ----------------------------------------------------------------------------- arithmetic env


def _solve_from_text(question: str) -> int:
    """An independent solver that reads the question text (not the generator's arithmetic)."""
    start = re.match(r"\w+ (?:has|buys|shares) (\d+)", question)
    assert start, question
    if " boxes with " in question:
        a, b = map(int, re.findall(r"(\d+)", question)[:2])
        return a * b
    if " equally among " in question:
        a, b = map(int, re.findall(r"(\d+)", question)[:2])
        return a // b
    value = int(start.group(1))
    if m := re.search(r"and buys (\d+) more", question):
        return value + int(m.group(1))
    if m := re.search(r"and gives (\d+) to", question):
        return value - int(m.group(1))
    for sentence in re.findall(r"Then [^.]*\.", question):
        n = int(re.search(r"(\d+)", sentence).group(1))
        if "finds" in sentence:
            value += n
        elif "gives away" in sentence:
            value -= n
        elif "times as many" in sentence:
            value *= n
        elif "equal piles" in sentence:
            assert value % n == 0, question
            value //= n
        else:
            raise AssertionError(sentence)
    return value


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3, 5])
def test_generated_answers_are_right(difficulty):
    rng = random.Random(difficulty)
    for _ in range(300):
        problem = generate_problem(rng, difficulty)
        assert int(problem.answer) == _solve_from_text(problem.question) >= 0


def test_difficulty_changes_problem_structure():
    def draw(difficulty, n=200):
        rng = random.Random(7)
        return [generate_problem(rng, difficulty) for _ in range(n)]

    easy = draw(0)
    assert all(max(map(int, re.findall(r"\d+", p.question))) <= 10 for p in easy)
    assert all(("buys" in p.question and "more" in p.question) or "gives" in p.question for p in easy)
    one_op = draw(1)
    assert any("boxes with" in p.question for p in one_op) and any("equally among" in p.question for p in one_op)
    assert max(int(n) for p in one_op for n in re.findall(r"\d+", p.question)) > 10
    for difficulty in (2, 3, 4):
        assert {p.question.count("Then ") for p in draw(difficulty)} == {difficulty}
    assert all("Then " not in p.question for p in easy + one_op)


def test_held_out_is_fixed_and_sized():
    a, b = ArithmeticEnv(difficulty=2, seed=3, held_out_size=20), ArithmeticEnv(difficulty=2, seed=3, held_out_size=20)
    assert a.held_out() == b.held_out()
    assert len(a.held_out()) == 20 and len({p.question for p in a.held_out()}) == 20
    assert ArithmeticEnv(difficulty=2, seed=4, held_out_size=20).held_out() != a.held_out()


def test_held_out_is_the_same_in_another_process():
    code = (
        "from clora.envs import ArithmeticEnv\n"
        "print(','.join(p.id for p in ArithmeticEnv(difficulty=1, seed=5, held_out_size=8).held_out()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = ",".join(p.id for p in ArithmeticEnv(difficulty=1, seed=5, held_out_size=8).held_out())
    assert out.stdout.strip() == here


def test_training_problems_never_repeat_held_out_questions():
    # Difficulty 0 has a small problem space, so an unfiltered stream hits held-out questions.
    env = ArithmeticEnv(difficulty=0, seed=0, held_out_size=400)
    held = {p.question for p in env.held_out()}
    unfiltered = random.Random(11)
    assert any(generate_problem(unfiltered, 0).question in held for _ in range(3000))
    train = env.train_problems(random.Random(11), 3000)
    assert len(train) == 3000
    assert not held & {p.question for p in train}


def test_training_draws_follow_the_rng():
    env = ArithmeticEnv(difficulty=1)
    assert env.train_problems(random.Random(1), 5) == env.train_problems(random.Random(1), 5)
    assert env.train_problems(random.Random(1), 5) != env.train_problems(random.Random(2), 5)


def test_envs_satisfy_the_protocols():
    env = ArithmeticEnv()
    assert isinstance(env, Env)
    assert isinstance(env.start(env.held_out()[0]), Episode)
    assert env.stop_sequences == ("</tool>",)


# ----------------------------------------------------------------------------- gsm8k loader


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_LINES = [
    json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
                "answer": "In May she sold 48/2 = <<48/2=24>>24.\n48+24 = <<48+24=72>>72\n#### 72"}),
    "",
    json.dumps({"question": "A shop sells 1,200 pens a day. How many in 2 days?", "answer": "#### 2,400"}),
    json.dumps({"question": "What is half of 5?", "answer": "2.5"}),
    json.dumps({"question": "What is 6 times 7?", "answer": 42}),
    json.dumps({"question": "What is 6 times 7?", "answer": 42}),  # duplicate, dropped
]


def test_gsm8k_loader_reads_answers_in_every_form(tmp_path):
    problems = load_jsonl_problems(_write(tmp_path, GOOD_LINES))
    assert [p.answer for p in problems] == ["72", "2400", "2.5", "42"]
    assert len({p.id for p in problems}) == 4 and all(p.id.startswith("gsm8k-") for p in problems)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty"),
        (["", "   "], "empty"),
        ([GOOD_LINES[0], "{not json"], ":2: not valid JSON"),
        ([GOOD_LINES[0], "", "[1, 2]"], ":3: expected a JSON object"),
        ([json.dumps({"answer": "3"})], ":1: 'question'"),
        ([json.dumps({"question": "  ", "answer": "3"})], ":1: 'question'"),
        ([json.dumps({"question": "q?"})], ":1: missing 'answer'"),
        ([json.dumps({"question": "q?", "answer": "#### seven"})], ":1: 'answer' must be a number"),
        ([json.dumps({"question": "q?", "answer": None})], ":1: 'answer' must be a number"),
    ],
)
def test_gsm8k_loader_names_file_and_line_of_bad_input(tmp_path, lines, message):
    path = _write(tmp_path, lines, name="bad.jsonl")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_jsonl_problems(path)
    assert "bad.jsonl" in str(err.value)


def test_gsm8k_loader_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl_problems(tmp_path / "nope.jsonl")


def _many_lines(n):
    return [json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": f"#### {2 * i + 1}"}) for i in range(n)]


def test_gsm8k_held_out_split_is_by_question_hash(tmp_path):
    lines = _many_lines(40)
    env = Gsm8kEnv.from_file(_write(tmp_path, lines), held_out_size=8)
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    env_shuffled = Gsm8kEnv.from_file(_write(tmp_path, shuffled, name="shuffled.jsonl"), held_out_size=8)
    held = {p.id for p in env.held_out()}
    assert len(held) == 8 and held == {p.id for p in env_shuffled.held_out()}
    train = env.train_problems(random.Random(0), 32)
    assert len({p.id for p in train}) == 32 and not held & {p.id for p in train}
    many = env.train_problems(random.Random(0), 100)  # more than the file has: drawn with replacement
    assert len(many) == 100 and not held & {p.id for p in many}


def test_gsm8k_held_out_is_at_most_half_of_a_small_file(tmp_path):
    env = Gsm8kEnv.from_file(_write(tmp_path, _many_lines(5)), held_out_size=32)
    assert len(env.held_out()) == 2
    with pytest.raises(ConfigError, match="at least 2"):
        Gsm8kEnv.from_file(_write(tmp_path, _many_lines(1), name="one.jsonl"))


def test_gsm8k_episode_rewards_the_file_answer(tmp_path):
    env = Gsm8kEnv.from_file(_write(tmp_path, GOOD_LINES), held_out_size=1)
    problem = next(p for p in env.held_out() + env.train_problems(random.Random(0), 3) if p.answer == "2400")
    assert env.start(problem).step("<tool>Final Answer: 2,400</tool>").reward == 1.0
    assert env.start(problem).step("<tool>Final Answer: 2401</tool>").reward == 0.0


# ----------------------------------------------------------------------------- make_env


def test_make_env_builds_each_kind(tmp_path):
    arithmetic = make_env(EnvConfig(kind="arithmetic", difficulty=2, seed=1, held_out_size=5))
    assert isinstance(arithmetic, ArithmeticEnv) and arithmetic.difficulty == 2 and len(arithmetic.held_out()) == 5
    path = _write(tmp_path, _many_lines(10))
    gsm = make_env(EnvConfig(kind="gsm8k", path=str(path), held_out_size=3))
    assert isinstance(gsm, Gsm8kEnv) and len(gsm.held_out()) == 3


def test_make_env_reports_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_env(EnvConfig(kind="gsm8k", path=str(tmp_path / "missing.jsonl")))


def test_reward_of_every_generated_problem_is_reachable():
    env = ArithmeticEnv(difficulty=3, held_out_size=50)
    for problem in env.held_out():
        assert env.start(problem).step(f"<tool>Final Answer: {problem.answer}</tool>").reward == 1.0
        assert math.isfinite(float(problem.answer))


def test_arithmetic_problems_name_the_operation_they_need():
    phrase = {"add": "more", "subtract": "to a friend", "multiply": "in each box", "divide": "equally among"}
    for difficulty, kinds in ((0, {"add", "subtract"}), (1, {"add", "subtract", "multiply", "divide"})):
        problems = ArithmeticEnv(difficulty=difficulty, seed=3, held_out_size=64).held_out()
        assert {p.kind for p in problems} == kinds
        for p in problems:
            assert phrase[p.kind] in p.question, (p.kind, p.question)
    stories = ArithmeticEnv(difficulty=2, seed=3, held_out_size=8).held_out()
    assert {p.kind for p in stories} == {"story2"}
