"""Trainer log-probs against vLLM's sampler log-probs for the same tokens and adapter (fp32, tiny model)."""

from __future__ import annotations

import asyncio

import pytest

from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.trainer import TrainerCore
from clora.messages import Datum, SamplingSpec
from clora.testing import make_data

pytestmark = pytest.mark.vllm

QUESTIONS = ("What is 12 plus 7?", "Name three colors.", "What is 6 times 8?")


async def test_trainer_logprobs_match_vllm_sampler_logprobs(tiny_engine, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    core = TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig())
    core.add_tenant("vs-vllm", LoraConfig(rank=8, alpha=16.0), OptimConfig(lr=3e-2))
    for step in range(3):  # a trained adapter (B != 0) that clearly moves the policy
        core.train_step("vs-vllm", make_data(4, seed=100 + step), LossConfig(kind="importance_sampling"))
    core.add_tenant("base", LoraConfig(rank=8, alpha=16.0), OptimConfig())  # version 0 == base model
    snap = core.export_adapter("vs-vllm", tmp_path / "vs-vllm")
    lora_id = tiny_engine.allocate_adapter_id()
    await tiny_engine.add_adapter(f"vs-vllm@v{snap.version}", lora_id, tmp_path / "vs-vllm")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    try:
        data: list[Datum] = []
        for i, q in enumerate(QUESTIONS):
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
            spec = SamplingSpec(n=2, max_tokens=24, temperature=1.0, seed=i, ignore_eos=True)
            out = await tiny_engine.generate(prompt, spec, (f"vs-vllm@v{snap.version}", lora_id, tmp_path / "vs-vllm"))
            for c in out.completions:
                n_p, n_c = len(prompt), len(c.token_ids)
                data.append(Datum(tokens=prompt + c.token_ids, loss_mask=[0.0] * n_p + [1.0] * n_c,
                                  advantages=[0.0] * (n_p + n_c), sampler_logprobs=[0.0] * n_p + c.logprobs))
    finally:
        await tiny_engine.remove_adapter(lora_id)
    trainer = await asyncio.to_thread(core.compute_logprobs, "vs-vllm", data)
    base = await asyncio.to_thread(core.compute_logprobs, "base", data)
    diffs, adapter_effect = [], []
    for d, ours, ref in zip(data, trainer, base):
        start = d.loss_mask.index(1.0)
        for i in range(start, len(d.tokens)):
            diffs.append(abs(ours[i] - d.sampler_logprobs[i]))
            adapter_effect.append(abs(ours[i] - ref[i]))
    mean_diff, max_diff = sum(diffs) / len(diffs), max(diffs)
    mean_effect = sum(adapter_effect) / len(adapter_effect)
    print(f"trainer vs vLLM log-probs over {len(diffs)} tokens: mean |diff| {mean_diff:.2e}, "
          f"max {max_diff:.2e}; adapter vs base mean |diff| {mean_effect:.2e}")
    assert mean_diff < 2e-5 and max_diff < 2e-4  # measured: mean 2.6e-06, max 1.5e-05
    assert mean_effect > 100 * mean_diff  # the adapter matters far more than the numeric noise
