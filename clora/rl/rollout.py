"""Multi-turn rollouts at the token level: episodes, groups, and their training data.

``run_episode`` drives one ``Episode``: sample a turn, let the env answer (tool messages),
append the rendering tokens, repeat until the env says done, ``max_turns`` is reached, or the
context is full. The sampler is injected (``SampleFn``), so the same code runs on vLLM and on
scripted fakes. The trajectory keeps every token of the conversation with a loss mask that is
1.0 only on tokens the policy sampled, and the sampler's log-prob of each of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from actors.gather import gather_first_error
from clora import events
from clora.rl.chat import ChatRenderer
from clora.envs.stepping import EnvStepTimeout, step_on_loop
from clora.envs.base import Env, Episode, Outcome, Problem, check_reward
from clora.errors import EnvError, NonFiniteError
from clora.messages import Completion, Datum, SamplingSpec

__all__ = [
    "FINISH_CONTEXT_FULL",
    "FINISH_DONE",
    "FINISH_MAX_TURNS",
    "SampleFn",
    "StepFn",
    "Trajectory",
    "completion_datum",
    "derive_seed",
    "run_episode",
    "run_group",
    "start_episode",
    "to_datum",
]

log = structlog.get_logger(__name__)

SampleFn = Callable[[list[int], SamplingSpec], Awaitable[tuple[Completion, int]]]
"""Sample one completion of a prompt; returns it and the adapter version that produced it."""

StepFn = Callable[[Episode, str], Awaitable[Any]]
"""Run ``episode.step(text)`` and return what it returned (``step_on_loop``, or a tenant's ``EnvStepper``)."""

FINISH_DONE = "done"
FINISH_MAX_TURNS = "max_turns"
FINISH_CONTEXT_FULL = "context_full"



class Trajectory(msgspec.Struct, kw_only=True):
    """One finished episode. ``tokens``, ``loss_mask`` and ``sampler_logprobs`` have equal length.

    ``loss_mask[i]`` is 1.0 where ``tokens[i]`` was sampled by the policy; prompt, tool output
    and rendering tokens are 0.0 with a 0.0 log-prob. ``versions[k]`` is the adapter version of
    turn ``k``; ``texts[k]`` its text. ``finish`` is one of the ``FINISH_*`` constants.
    """

    problem_id: str
    tokens: list[int]
    loss_mask: list[float]
    sampler_logprobs: list[float]
    prompt_len: int
    reward: float
    turns: int
    versions: list[int]
    texts: list[str]
    finish: str
    finish_reasons: list[str | None]  # the sampler's finish reason of each turn
    info: dict[str, Any]
    messages: list[dict[str, str]]  # the conversation as chat messages (for logs and eval)
    duration_s: float = 0.0

    @property
    def num_policy_tokens(self) -> int:
        return int(sum(self.loss_mask))


def derive_seed(seed: int | None, *salt: object) -> int | None:
    """A seed for one part of a seeded whole (a step, a problem, an episode, a turn); None stays None.
    Stable across processes and Python versions (sha256, not ``hash``)."""
    if seed is None:
        return None
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


async def _step(episode: Episode, text: str, pid: str, step_env: StepFn) -> Outcome:
    try:
        outcome = await step_env(episode, text)
    except asyncio.CancelledError:
        raise
    except EnvStepTimeout as e:
        raise EnvError(f"env step on problem {pid} {e}") from e
    except Exception as e:
        raise EnvError(f"env step raised on problem {pid}: {type(e).__name__}: {e}") from e
    if not isinstance(outcome, Outcome):
        raise EnvError(f"env step returned {type(outcome).__name__} for problem {pid}, expected Outcome")
    return outcome


def _check_completion(completion: Completion, spec: SamplingSpec, pid: str) -> None:
    n = len(completion.token_ids)
    if len(completion.logprobs) != n:
        raise ValueError(f"problem {pid}: sampler returned {n} tokens but {len(completion.logprobs)} logprobs")
    if n > spec.max_tokens:
        raise ValueError(f"problem {pid}: sampler returned {n} tokens, more than max_tokens={spec.max_tokens}")


async def run_episode(
    sample: SampleFn,
    renderer: ChatRenderer,
    episode: Episode,
    *,
    max_turns: int,
    sampling: SamplingSpec,
    max_model_len: int,
    step_env: StepFn = step_on_loop,
) -> Trajectory:
    """Run one episode to its end; see the module docstring.

    Each turn samples at most ``min(sampling.max_tokens, room left in max_model_len)`` tokens.
    The reward is the env's reward of its final (done) turn; an episode cut by ``max_turns``
    or a full context gets 0.0. Env errors, bad rewards and steps past their deadline raise
    ``EnvError``. The env's step runs through ``step_env`` (a tenant's ``EnvStepper``: in the
    tenant's thread, under ``env.step_timeout_s``; by default on the loop).
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    started = time.perf_counter()
    problem: Problem = episode.problem
    pid = problem.id
    messages = list(episode.initial_messages())
    tokens = renderer.initial(messages)
    prompt_len = len(tokens)
    mask = [0.0] * prompt_len
    logprobs = [0.0] * prompt_len
    versions: list[int] = []
    texts: list[str] = []
    finish_reasons: list[str | None] = []
    reward, finish, info = 0.0, FINISH_MAX_TURNS, {}

    for turn in range(max_turns):
        room = max_model_len - len(tokens)
        if room < 1:
            finish, reward = FINISH_CONTEXT_FULL, 0.0
            info = {"error": f"context full: {len(tokens)} tokens leave no room in max_model_len {max_model_len}"}
            log.info(events.EPISODE_CONTEXT_FULL, problem=pid, turn=turn, tokens=len(tokens), max_model_len=max_model_len)
            break
        spec = msgspec.structs.replace(
            sampling, n=1, max_tokens=min(sampling.max_tokens, room), seed=derive_seed(sampling.seed, turn)
        )
        completion, version = await sample(list(tokens), spec)
        _check_completion(completion, spec, pid)
        tokens += completion.token_ids
        mask += [1.0] * len(completion.token_ids)
        logprobs += completion.logprobs
        versions.append(int(version))
        texts.append(completion.text)
        finish_reasons.append(completion.finish_reason)
        messages.append({"role": "assistant", "content": completion.text})

        outcome = await _step(episode, completion.text, pid, step_env)
        step_reward = check_reward(outcome.reward, problem)
        info = dict(outcome.info)
        if outcome.done:
            finish, reward = FINISH_DONE, step_reward
            break
        if turn == max_turns - 1:
            finish, reward = FINISH_MAX_TURNS, 0.0
            info["error"] = f"no final answer within {max_turns} turns"
            break
        continuation = renderer.continuation(completion.token_ids, outcome.tool_messages)
        if len(tokens) + len(continuation) >= max_model_len:
            finish, reward = FINISH_CONTEXT_FULL, 0.0
            info["error"] = f"context full: the next turn would not fit in max_model_len {max_model_len}"
            log.info(events.EPISODE_CONTEXT_FULL, problem=pid, turn=turn + 1, tokens=len(tokens), max_model_len=max_model_len)
            break
        tokens += continuation
        mask += [0.0] * len(continuation)
        logprobs += [0.0] * len(continuation)
        messages.extend(outcome.tool_messages)

    return Trajectory(
        problem_id=pid,
        tokens=tokens,
        loss_mask=mask,
        sampler_logprobs=logprobs,
        prompt_len=prompt_len,
        reward=reward,
        turns=len(versions),
        versions=versions,
        texts=texts,
        finish=finish,
        finish_reasons=finish_reasons,
        info=info,
        messages=messages,
        duration_s=time.perf_counter() - started,
    )


def start_episode(env: Env, problem: Problem) -> Episode:
    """``env.start(problem)``, with an env failure reported as ``EnvError``."""
    try:
        return env.start(problem)
    except Exception as e:
        raise EnvError(f"env {getattr(env, 'name', env)!r} could not start problem {problem.id}: {e}") from e


async def run_group(
    sample: SampleFn,
    renderer: ChatRenderer,
    env: Env,
    problem: Problem,
    group_size: int,
    *,
    max_turns: int,
    sampling: SamplingSpec,
    max_model_len: int,
    step_env: StepFn = step_on_loop,
) -> list[Trajectory]:
    """``group_size`` episodes of one problem, concurrently (their turns batch in the sampler).

    The env's ``stop_sequences`` are added to ``sampling.stop``. If one episode fails, the
    others are cancelled and its error is raised (not an ExceptionGroup); cancelling
    ``run_group`` cancels every episode and re-raises ``CancelledError``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    stops = tuple(dict.fromkeys((*sampling.stop, *getattr(env, "stop_sequences", ()))))
    episodes = [start_episode(env, problem) for _ in range(group_size)]
    return await gather_first_error(
        run_episode(
            sample,
            renderer,
            episode,
            max_turns=max_turns,
            sampling=msgspec.structs.replace(sampling, stop=stops, seed=derive_seed(sampling.seed, i)),
            max_model_len=max_model_len,
            step_env=step_env,
        )
        for i, episode in enumerate(episodes)
    )


def to_datum(trajectory: Trajectory, advantage: float) -> Datum:
    """Training data of one trajectory: ``advantage`` on every policy token, 0.0 elsewhere; tagged with
    the oldest adapter version that sampled it (its staleness is counted from that one)."""
    if not math.isfinite(advantage):
        raise NonFiniteError(f"advantage {advantage!r} for problem {trajectory.problem_id} is not finite")
    return Datum(
        tokens=list(trajectory.tokens),
        loss_mask=list(trajectory.loss_mask),
        advantages=[advantage * m for m in trajectory.loss_mask],
        sampler_logprobs=list(trajectory.sampler_logprobs),
        sampler_version=min(trajectory.versions) if trajectory.versions else None,
    )


def completion_datum(prompt_token_ids: list[int], completion: Completion, advantage: float) -> Datum:
    """Training data of one single-turn sample: the prompt masked out, ``advantage`` on each sampled token."""
    if not math.isfinite(advantage):
        raise NonFiniteError(f"advantage {advantage!r} is not finite")
    n_prompt, n_completion = len(prompt_token_ids), len(completion.token_ids)
    mask = [0.0] * n_prompt + [1.0] * n_completion
    return Datum(
        tokens=[*prompt_token_ids, *completion.token_ids],
        loss_mask=mask,
        advantages=[advantage * m for m in mask],
        sampler_logprobs=[0.0] * n_prompt + list(completion.logprobs),
    )
