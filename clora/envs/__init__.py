"""Environments: the ``Env`` protocol, the built-in arithmetic tool-use env, a GSM8K jsonl loader.

``make_env(EnvConfig)`` builds the env a tenant trains on; see docs/envs.md for the tool
format, rewards, difficulty levels and how to write your own ``Env``.
"""

from __future__ import annotations

from clora.config import EnvConfig
from clora.envs.arithmetic import ArithmeticEnv, generate_problem
from clora.envs.base import Env, Episode, Outcome, Problem, answers_match, check_reward, parse_number, problem_id
from clora.envs.calculator import CalculatorError, evaluate, format_number
from clora.envs.single_turn import SINGLE_TURN_INSTRUCTIONS, SingleTurnEpisode
from clora.envs.gsm8k import Gsm8kEnv, load_jsonl_problems, parse_answer
from clora.envs.tools import (
    CALCULATOR,
    FINAL_ANSWER,
    TOOL_STOP_SEQUENCES,
    TOOL_INSTRUCTIONS,
    TOOL_SYSTEM_PROMPT,
    ExampleStyle,
    ToolCall,
    ToolUseEpisode,
    WorkedExample,
    parse_tool_call,
    tool_system_prompt,
    worked_examples,
)
from clora.errors import ConfigError

__all__ = [
    "Env",
    "Episode",
    "Outcome",
    "Problem",
    "check_reward",
    "answers_match",
    "parse_number",
    "problem_id",
    "CalculatorError",
    "evaluate",
    "format_number",
    "ToolCall",
    "parse_tool_call",
    "ToolUseEpisode",
    "TOOL_SYSTEM_PROMPT",
    "TOOL_INSTRUCTIONS",
    "ExampleStyle",
    "WorkedExample",
    "worked_examples",
    "tool_system_prompt",
    "TOOL_STOP_SEQUENCES",
    "CALCULATOR",
    "FINAL_ANSWER",
    "ArithmeticEnv",
    "SingleTurnEpisode",
    "SINGLE_TURN_INSTRUCTIONS",
    "generate_problem",
    "Gsm8kEnv",
    "load_jsonl_problems",
    "parse_answer",
    "make_env",
]


def make_env(cfg: EnvConfig) -> Env:
    """The env named by ``cfg.kind``; a bad file or value raises ``ConfigError``."""
    if cfg.kind == "arithmetic":
        return ArithmeticEnv(
            difficulty=cfg.difficulty, seed=cfg.seed, held_out_size=cfg.held_out_size, examples=cfg.examples,
            single_turn=cfg.single_turn,
        )
    if cfg.kind == "gsm8k":
        if not cfg.path:
            raise ConfigError("env.path: the gsm8k env needs a jsonl file path")
        return Gsm8kEnv.from_file(cfg.path, held_out_size=cfg.held_out_size, examples=cfg.examples)
    raise ConfigError(f"env.kind: unknown env {cfg.kind!r} (use 'arithmetic' or 'gsm8k')")
