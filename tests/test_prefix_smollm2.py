"""Shared-prefix training equals the naive path on the real SmolLM2-135M (fp32, 30 layers).

One GRPO group of 6 sharing a 240-token prompt, ~42-token multi-turn completions (a tool turn
inside), micro-batches of 4 that split the group, LoRA rank 8 on all linear layers. Under bf16
autocast any two orderings of the same sums drift by far more than fp32 rounding, so the check is
in fp32.

Marked ``slow`` (``make test-all`` runs it): it loads SmolLM2 twice and trains it in fp32, and the default
run already proves the same code path equal to the naive one on the tiny llama (tests/test_prefix.py:
log-probs, losses, every gradient and the weights after steps, in fp32 and float64).
"""

from __future__ import annotations

import pytest
import torch

from clora.bench.trainer_rollout import RolloutShape, rollout_data
from clora.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, TrainerConfig
from clora.errors import ModelNotFoundError
from clora.messages import Datum
from clora.trainer import TrainerCore

pytestmark = [pytest.mark.smollm2, pytest.mark.slow, pytest.mark.timeout(1800)]

SHAPE = RolloutShape(groups=1, group_size=6, system_len=220, question_len=20, completion_len=42, tool_len=8)
# fp32 rounding over 30 layers. Measured: log-probs ~2e-5, gradients ~1e-5 of the largest one.
LOGP_ATOL = 2e-4
GRAD_RTOL = 1e-4
WEIGHT_ATOL = 1e-5  # Adam lr 1e-3, eps 1e-3: a weight moves at most lr * dg / eps from a rounding dg


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, TrainerCore]:
    """Two cores on SmolLM2 (naive, shared) with one tenant starting from a random adapter (B != 0,
    so the prompt's keys/values depend on it)."""
    from clora.models import random_lora_adapter, resolve_model

    try:
        model_dir = resolve_model(ModelConfig())
    except ModelNotFoundError as e:
        pytest.skip(f"SmolLM2 is not available here: {e}")
    adapter = random_lora_adapter(model_dir, tmp_path_factory.mktemp("adapter"), rank=8, alpha=16.0, seed=3)
    cores = {}
    for m in (False, True):
        cores[m] = TrainerCore.from_model_dir(model_dir, TrainerConfig(micro_batch_size=4, shared_prefix=m))
        cores[m].add_tenant("eq", LoraConfig(rank=8, alpha=16.0), OptimConfig(lr=1e-3, eps=1e-3), init_from=adapter)
    return cores


def test_smollm2_shared_prefix_equals_naive_in_fp32(pair):
    loss = LossConfig()
    data = rollout_data(pair[True].vocab_size, SHAPE, seed=5)
    naive, shared = (pair[m].compute_logprobs("eq", data) for m in (False, True))
    diff = max(abs(a - b) for ra, rb in zip(naive, shared, strict=True) for a, b in zip(ra, rb, strict=True))
    assert diff < LOGP_ATOL

    data = [  # on policy: the trainer's own log-probs as the sampler's
        Datum(tokens=d.tokens, loss_mask=d.loss_mask, advantages=d.advantages, sampler_logprobs=lp)
        for d, lp in zip(data, naive, strict=True)
    ]
    got = {m: pair[m].forward_backward("eq", data, loss) for m in (False, True)}
    for key in ("loss", "kl_sampler", "entropy", "clip_frac"):  # no KL penalty: no "kl"
        assert got[True][key] == pytest.approx(got[False][key], rel=1e-4, abs=1e-6), key
    assert got[True]["tokens_computed"] < 0.4 * got[False]["tokens_computed"]
    grads = {m: pair[m].store("eq").grads for m in (False, True)}
    scale = max(float(g.abs().max()) for g in grads[False].values())
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, rtol=0, atol=GRAD_RTOL * scale, msg=k)

    for core in pair.values():
        core.optim_step("eq")
    for k, p in pair[False].store("eq").params.items():
        torch.testing.assert_close(pair[True].store("eq").params[k], p, rtol=0, atol=WEIGHT_ATOL, msg=k)
