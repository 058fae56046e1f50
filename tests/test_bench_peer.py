"""The peer loop (transformers + peft) on the tiny model: batched sampling, one training step. No vLLM."""

from __future__ import annotations

import asyncio

import pytest
import torch

from clora.bench.concurrency import QUICK, experiments
from clora.config import ModelConfig
from clora.messages import Datum, SamplingSpec
from clora.models import resolve_model
from clora.bench.peer import PeerLoop

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def loop() -> PeerLoop:
    exp = experiments(QUICK, 1)[0]
    return PeerLoop(exp, str(resolve_model(ModelConfig(source="tiny"))), max_model_len=256)


async def test_turns_waiting_together_decode_in_one_generate_call(loop, monkeypatch):
    calls: list[int] = []
    real = loop.sampler._generate

    def counting(prompts, *args):
        calls.append(len(prompts))
        return real(prompts, *args)

    monkeypatch.setattr(loop.sampler, "_generate", counting)
    prompt = loop.renderer.initial([{"role": "user", "content": "1 + 2"}])
    spec = SamplingSpec(max_tokens=6, temperature=1.0)
    results = await asyncio.gather(*(loop.sampler(prompt, spec) for _ in range(4)))
    assert calls == [4]
    for completion, version in results:
        assert version == loop.sampler.version
        assert 1 <= len(completion.token_ids) <= 6
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(lp <= 0.0 for lp in completion.logprobs)


def test_train_updates_the_lora_weights(loop):
    prompt = loop.renderer.initial([{"role": "user", "content": "2 * 3"}])
    tokens = prompt + [5, 6, 7, 8]
    mask = [0.0] * len(prompt) + [1.0] * 4
    data = [Datum(tokens=tokens, loss_mask=mask, advantages=[a * m for m in mask], sampler_logprobs=[0.0] * len(mask))
            for a in (1.0, -1.0)]
    before = [p.detach().clone() for p in loop.params]
    version = loop.sampler.version
    loop.train(data)
    assert loop.sampler.version == version + 1
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, loop.params))
