"""Multi-turn rollouts on a scripted engine and SmolLM2's real tokenizer: masks, logprobs, budget, groups."""

from __future__ import annotations

import asyncio
import itertools
import math
import random

import pytest

from clora.rl.chat import ChatRenderer
from clora.envs import ArithmeticEnv, Env, Episode, Outcome, Problem, ToolUseEpisode
from clora.errors import EnvError, NonFiniteError
from clora.messages import Completion, SamplingSpec
from clora.rl.rollout import (
    FINISH_CONTEXT_FULL,
    FINISH_DONE,
    FINISH_MAX_TURNS,
    run_episode,
    run_group,
    to_datum,
)
from clora.testing import FakeEngine

PROBLEM = Problem(id="p-19", question="Tom has 12 apples and buys 7 more. How many apples does he have?", answer="19")
SPEC = SamplingSpec(max_tokens=64, temperature=1.0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


def _scripted(tokenizer, texts, *, close=True):
    """A FakeEngine replaying ``texts`` (each ended by <|im_end|> when ``close``) and its sample function,
    which reports adapter versions 3, 4, ... (one per call)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if close else None
    engine = FakeEngine(texts, tokenizer=tokenizer, eos_token_id=im_end)
    return engine, engine.sample_fn(versions=itertools.count(3))


async def test_calculator_then_final_answer_over_two_turns(tokenizer, renderer):
    engine, sampler = _scripted(tokenizer, ["<tool>Calculator: 12+7</tool>", "<tool>Final Answer: 19</tool>"])
    traj = await run_episode(sampler, renderer, ToolUseEpisode(PROBLEM), max_turns=3, sampling=SPEC, max_model_len=1024)
    assert (traj.reward, traj.turns, traj.finish) == (1.0, 2, FINISH_DONE)
    assert traj.versions == [3, 4]
    assert traj.texts == ["<tool>Calculator: 12+7</tool>", "<tool>Final Answer: 19</tool>"]
    assert len(traj.tokens) == len(traj.loss_mask) == len(traj.sampler_logprobs)

    first, second = engine.completions
    prompt1, prompt2 = (r.prompt_token_ids for r in engine.requests)
    assert traj.tokens[: len(prompt1)] == prompt1 and traj.prompt_len == len(prompt1)
    # the second prompt extends the first by the verbatim completion and the continuation
    assert prompt2[: len(prompt1) + len(first.token_ids)] == prompt1 + first.token_ids
    continuation = prompt2[len(prompt1) + len(first.token_ids):]
    assert continuation == renderer.continuation(first.token_ids, [{"role": "tool", "content": "19"}])
    assert traj.tokens == prompt2 + second.token_ids

    # masks: 1.0 exactly on the sampled tokens, with their logprobs; 0.0 (and logprob 0.0) elsewhere
    policy_positions = [i for i, m in enumerate(traj.loss_mask) if m == 1.0]
    assert [traj.tokens[i] for i in policy_positions] == first.token_ids + second.token_ids
    assert [traj.sampler_logprobs[i] for i in policy_positions] == first.logprobs + second.logprobs
    assert all(traj.sampler_logprobs[i] == 0.0 for i, m in enumerate(traj.loss_mask) if m == 0.0)
    assert set(traj.loss_mask) == {0.0, 1.0}
    tool_turn = tokenizer.decode([traj.tokens[i] for i in range(len(prompt1) + len(first.token_ids), len(prompt2))])
    assert tool_turn == "\n<|im_start|>tool\n19<|im_end|>\n<|im_start|>assistant\n"
    assert traj.messages[-2:] == [{"role": "tool", "content": "19"}, {"role": "assistant", "content": traj.texts[1]}]


async def test_a_completion_cut_without_im_end_gets_a_masked_closing_token(tokenizer, renderer):
    engine, sampler = _scripted(tokenizer, ["<tool>Calculator: 12+7", "<tool>Final Answer: 19"], close=False)
    traj = await run_episode(sampler, renderer, ToolUseEpisode(PROBLEM), max_turns=3, sampling=SPEC, max_model_len=1024)
    assert traj.reward == 1.0
    end_of_first = traj.prompt_len + len(engine.completions[0].token_ids)
    assert traj.tokens[end_of_first] == renderer.im_end_id and traj.loss_mask[end_of_first] == 0.0
    assert renderer.im_end_id not in [t for t, m in zip(traj.tokens, traj.loss_mask) if m == 1.0]


@pytest.mark.parametrize(
    ("texts", "reward", "turns", "finish"),
    [
        (["The answer is 19."], 0.0, 1, FINISH_DONE),
        (["<tool>Final Answer: 20</tool>"], 0.0, 1, FINISH_DONE),
        (["<tool>Final Answer: 19</tool>"], 1.0, 1, FINISH_DONE),
        (["<tool>Calculator: 1/0</tool>", "<tool>Final Answer: 19</tool>"], 1.0, 2, FINISH_DONE),
        (["<tool>Calculator: 12+7</tool>"], 0.0, 3, FINISH_MAX_TURNS),
    ],
)
async def test_episode_rewards_and_endings(tokenizer, renderer, texts, reward, turns, finish):
    engine, sampler = _scripted(tokenizer, texts)
    traj = await run_episode(sampler, renderer, ToolUseEpisode(PROBLEM), max_turns=3, sampling=SPEC, max_model_len=1024)
    assert (traj.reward, traj.turns, traj.finish) == (reward, turns, finish)
    assert len(engine.requests) == turns


async def test_per_turn_budget_is_capped_by_the_context(tokenizer, renderer):
    episode = ToolUseEpisode(PROBLEM)
    prompt_len = len(renderer.initial(episode.initial_messages()))
    engine, sampler = _scripted(tokenizer, ["<tool>Calculator: 12+7</tool>", "<tool>Final Answer: 19</tool>"])
    max_model_len = prompt_len + 12
    traj = await run_episode(sampler, renderer, episode, max_turns=3, sampling=SPEC, max_model_len=max_model_len)
    assert engine.requests[0].sampling.max_tokens == 12  # not the 64 asked for
    assert len(engine.requests) == 1  # the tool reply and a new turn do not fit
    assert (traj.reward, traj.finish) == (0.0, FINISH_CONTEXT_FULL) and "context full" in traj.info["error"]
    assert len(traj.tokens) <= max_model_len


async def test_every_prompt_plus_budget_fits_the_context(tokenizer, renderer):
    episode = ToolUseEpisode(PROBLEM)
    prompt_len = len(renderer.initial(episode.initial_messages()))
    max_model_len = prompt_len + 40
    engine, sampler = _scripted(tokenizer, ["<tool>Calculator: 12+7</tool>", "<tool>Final Answer: 19</tool>"])
    traj = await run_episode(sampler, renderer, episode, max_turns=3, sampling=SPEC, max_model_len=max_model_len)
    assert len(engine.requests) == 2 and traj.reward == 1.0
    assert engine.requests[1].sampling.max_tokens < SPEC.max_tokens
    assert all(len(r.prompt_token_ids) + r.sampling.max_tokens <= max_model_len for r in engine.requests)


async def test_a_prompt_that_fills_the_context_never_samples(tokenizer, renderer):
    episode = ToolUseEpisode(PROBLEM)
    prompt_len = len(renderer.initial(episode.initial_messages()))
    engine, sampler = _scripted(tokenizer, ["<tool>Final Answer: 19</tool>"])
    traj = await run_episode(sampler, renderer, episode, max_turns=3, sampling=SPEC, max_model_len=prompt_len)
    assert engine.requests == []
    assert (traj.reward, traj.turns, traj.finish) == (0.0, 0, FINISH_CONTEXT_FULL)
    assert sum(traj.loss_mask) == 0


class _BadRewardEpisode(ToolUseEpisode):
    def step(self, assistant_text):
        return Outcome(done=True, reward=float("nan"))


class _RaisingEpisode(ToolUseEpisode):
    def step(self, assistant_text):
        raise KeyError("tool table")


async def test_env_bugs_become_env_errors_naming_the_problem(tokenizer, renderer):
    engine, sampler = _scripted(tokenizer, ["<tool>Final Answer: 19</tool>"])
    with pytest.raises(EnvError, match="p-19"):
        await run_episode(sampler, renderer, _BadRewardEpisode(PROBLEM), max_turns=2, sampling=SPEC, max_model_len=1024)
    with pytest.raises(EnvError, match="p-19.*KeyError"):
        await run_episode(sampler, renderer, _RaisingEpisode(PROBLEM), max_turns=2, sampling=SPEC, max_model_len=1024)


async def test_sampler_output_with_misaligned_logprobs_is_refused(renderer):
    async def broken(prompt, spec):
        return Completion(token_ids=[5, 6, 7], logprobs=[-0.1], text="x", finish_reason="length"), 0

    with pytest.raises(ValueError, match="3 tokens but 1 logprobs"):
        await run_episode(broken, renderer, ToolUseEpisode(PROBLEM), max_turns=1, sampling=SPEC, max_model_len=1024)


# ----------------------------------------------------------------------------- groups


async def test_group_runs_episodes_concurrently_with_distinct_seeds(tokenizer, renderer):
    in_flight, peak = 0, 0
    all_in = asyncio.Event()
    specs: list[SamplingSpec] = []
    answer = tokenizer.encode("<tool>Final Answer: 19</tool>", add_special_tokens=False)

    async def sample(prompt, spec):
        nonlocal in_flight, peak
        specs.append(spec)
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 4:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), timeout=5)
        in_flight -= 1
        return Completion(token_ids=answer, logprobs=[-0.5] * len(answer), text="<tool>Final Answer: 19</tool>",
                          finish_reason="stop"), 7

    env = ArithmeticEnv(difficulty=0)
    trajs = await run_group(sample, renderer, env, PROBLEM, 4, max_turns=2,
                            sampling=SamplingSpec(max_tokens=32, seed=123), max_model_len=1024)
    assert peak == 4
    assert [t.reward for t in trajs] == [1.0] * 4 and all(t.versions == [7] for t in trajs)
    assert len({s.seed for s in specs}) == 4 and None not in {s.seed for s in specs}
    assert all(s.stop == ("</tool>",) and s.n == 1 for s in specs)


async def test_cancelling_a_group_cancels_every_episode(tokenizer, renderer):
    started, cancelled = 0, 0
    all_started = asyncio.Event()

    async def hang(prompt, spec):
        nonlocal started, cancelled
        started += 1
        if started == 3:
            all_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        raise AssertionError("unreachable")

    task = asyncio.create_task(run_group(hang, renderer, ArithmeticEnv(), PROBLEM, 3, max_turns=2,
                                         sampling=SPEC, max_model_len=1024))
    await asyncio.wait_for(all_started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == 3


async def test_one_failing_episode_cancels_the_others_and_raises_its_error(tokenizer, renderer):
    calls, cancelled = 0, 0

    async def sample(prompt, spec):
        nonlocal calls, cancelled
        calls += 1
        if calls == 2:
            await asyncio.sleep(0.01)
            raise EnvError("sampler says no")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        raise AssertionError("unreachable")

    with pytest.raises(EnvError, match="sampler says no"):  # the error itself, not an ExceptionGroup
        await run_group(sample, renderer, ArithmeticEnv(), PROBLEM, 3, max_turns=2, sampling=SPEC, max_model_len=1024)
    assert cancelled == 2


# ----------------------------------------------------------------------------- training data


async def test_to_datum_puts_the_advantage_on_policy_tokens_only(tokenizer, renderer):
    engine, sampler = _scripted(tokenizer, ["<tool>Calculator: 12+7</tool>", "<tool>Final Answer: 19</tool>"])
    traj = await run_episode(sampler, renderer, ToolUseEpisode(PROBLEM), max_turns=3, sampling=SPEC, max_model_len=1024)
    datum = to_datum(traj, -0.75)
    assert datum.tokens == traj.tokens and datum.loss_mask == traj.loss_mask
    assert datum.sampler_logprobs == traj.sampler_logprobs
    assert datum.advantages == [-0.75 if m else 0.0 for m in traj.loss_mask]
    assert sum(1 for a in datum.advantages if a != 0.0) == traj.num_policy_tokens > 0
    with pytest.raises(NonFiniteError, match="p-19"):
        to_datum(traj, math.nan)


# ----------------------------------------------------------------------------- a user env (the docs' example)


async def test_the_documented_user_env_runs_through_run_group(tokenizer, renderer, doc_snippets):
    code = doc_snippets("docs/envs.md", after="## Writing your own Env")[0]
    namespace: dict = {}
    exec(compile(code, "docs/envs.md", "exec"), namespace)  # noqa: S102 - the project's own docs
    env = namespace["EchoEnv"]()
    assert isinstance(env, Env)
    held = {p.id for p in env.held_out()}
    train = env.train_problems(random.Random(0), 20)
    assert not held & {p.id for p in train}
    problem = train[0]
    assert isinstance(env.start(problem), Episode)
    engine, sampler = _scripted(tokenizer, [problem.answer, "wrong"])
    trajs = await run_group(sampler, renderer, env, problem, 2, max_turns=2, sampling=SPEC, max_model_len=1024)
    assert sorted(t.reward for t in trajs) == [0.0, 1.0]
    assert all(t.turns == 1 and t.finish == FINISH_DONE for t in trajs)


def test_completion_datum_masks_the_prompt_and_aligns_logprobs():
    from clora.messages import Completion
    from clora.rl.rollout import completion_datum

    c = Completion(token_ids=[7, 8], logprobs=[-0.5, -1.5], text="xy", finish_reason="stop")
    d = completion_datum([1, 2, 3], c, advantage=-2.0)
    assert d.tokens == [1, 2, 3, 7, 8]
    assert d.loss_mask == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert d.advantages == [0.0, 0.0, 0.0, -2.0, -2.0]
    assert d.sampler_logprobs == [0.0, 0.0, 0.0, -0.5, -1.5]
    with pytest.raises(NonFiniteError):
        completion_datum([1], c, advantage=float("nan"))
