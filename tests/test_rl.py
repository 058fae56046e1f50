"""Unit tests of clora.rl against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clora.config import LossConfig
from clora.errors import ConfigError
from clora.messages import Datum
from clora.rl import (
    collate,
    cross_entropy_loss,
    group_advantages,
    importance_sampling_loss,
    kl_k3,
    loss_denominator,
    loss_numerator,
    masked_mean,
    micro_batches,
    ppo_clip_loss,
    token_entropy,
    token_logprobs,
    token_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_token_logprobs_are_shifted_and_normalised():
    # logits[:, 0] = [0, ln2, 0] -> probs [1/4, 1/2, 1/4]; logits[:, 1] uniform -> 1/3 each
    logits = torch.tensor([[[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])  # (1, 3, 3)
    tokens = torch.tensor([[2, 1, 2]])  # (1, 3)
    logp = token_logprobs(logits, tokens)  # (1, 3)
    expected = torch.tensor([[0.0, math.log(0.5), math.log(1 / 3)]])
    torch.testing.assert_close(logp, expected)


def test_token_logprobs_bf16_logits_are_computed_in_fp32():
    logits = torch.tensor([[[0.0, LN2, 0.0], [0.0, 0.0, 0.0]]]).to(torch.bfloat16)  # (1, 2, 3)
    logp = token_logprobs(logits, torch.tensor([[0, 1]]))
    assert logp.dtype == torch.float32
    assert logp[0, 1].item() == pytest.approx(math.log(0.5), abs=1e-2)


def test_token_entropy_by_hand():
    logits = torch.tensor([[[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # (1, 3, 3)
    entropy = token_entropy(logits)  # (1, 3)
    quarter_half = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    torch.testing.assert_close(entropy, torch.tensor([[0.0, quarter_half, LN3]]))


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, "grpo", eps=0.0)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    assert torch.equal(group_advantages(rewards, "grpo")[2], torch.zeros(4))  # equal rewards: no signal


def test_grpo_no_std_is_centred_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0]])
    adv = group_advantages(rewards, "grpo_no_std")
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, 2.25, -0.75, -0.75]]))


def test_grpo_group_of_one_and_bad_input():
    assert group_advantages(torch.tensor([[7.0]]), "grpo").item() == 0.0
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown advantage kind"):
        group_advantages(torch.zeros(1, 2), "ppo")  # type: ignore[arg-type]


def _logp(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # (1, T)


def test_importance_sampling_loss_and_gradient():
    logp = _logp(0.5, 0.5).requires_grad_(True)  # (1, 2)
    sampler = _logp(0.25, 0.5)  # ratio 2 and 1
    adv = torch.tensor([[3.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss = importance_sampling_loss(logp, sampler, adv, mask)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-6.0, 0.0]]))
    loss.sum().backward()
    # d(-ratio * A)/dlogp = -ratio * A on trained tokens, 0 where masked out
    torch.testing.assert_close(logp.grad, torch.tensor([[-6.0, 0.0]]))


def test_ppo_clip_by_hand():
    # ratios 2, 0.5, 1.1, 2 with advantages 1, -1, 1, -1; clip 0.2 both sides
    logp = _logp(0.5, 0.25, 0.55, 0.5).requires_grad_(True)
    sampler = _logp(0.25, 0.5, 0.5, 0.25)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clipped = ppo_clip_loss(logp, sampler, adv, mask, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2, 0.8, -1.1, 2.0]]))
    assert clipped.tolist() == [[True, True, False, False]]
    loss.sum().backward()
    # clipped tokens get no gradient; unclipped ones -ratio * A
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.1, 2.0]]))


def test_ppo_asymmetric_clip():
    logp, sampler = _logp(0.5), _logp(0.25)  # ratio 2
    loss, _ = ppo_clip_loss(logp, sampler, torch.tensor([[1.0]]), torch.ones(1, 1), clip_low=0.1, clip_high=0.5)
    assert loss.item() == pytest.approx(-1.5)


def test_kl_k3_by_hand_and_zero_when_equal():
    logp, sampler = _logp(0.5, 0.3), _logp(0.25, 0.3)  # ratio 2, then 1
    kl = kl_k3(logp, sampler, torch.ones(1, 2))
    torch.testing.assert_close(kl, torch.tensor([[2.0 - 1.0 - LN2, 0.0]]))


def test_cross_entropy_is_masked_nll():
    logp = _logp(0.5, 0.25)
    torch.testing.assert_close(cross_entropy_loss(logp, torch.tensor([[1.0, 0.0]])), torch.tensor([[LN2, 0.0]]))


def test_token_loss_adds_kl_penalty_for_policy_gradient_only():
    logp, sampler = _logp(0.5), _logp(0.25)  # ratio 2
    adv, mask = torch.tensor([[1.0]]), torch.ones(1, 1)
    k3 = 1.0 - LN2
    is_parts = token_loss(LossConfig(kind="importance_sampling", kl_coef=0.5), logp, sampler, adv, mask)
    assert is_parts.per_token.item() == pytest.approx(-2.0 + 0.5 * k3)
    ppo_parts = token_loss(LossConfig(kind="ppo", kl_coef=0.5), logp, sampler, adv, mask)
    assert ppo_parts.per_token.item() == pytest.approx(-1.2 + 0.5 * k3)
    assert ppo_parts.clipped.item()
    ce_parts = token_loss(LossConfig(kind="cross_entropy", kl_coef=0.5), logp, sampler, adv, mask)
    assert ce_parts.per_token.item() == pytest.approx(LN2)


def test_masked_out_extreme_values_give_finite_loss_and_gradients():
    logp = torch.tensor([[-0.1, -0.2]], requires_grad=True)
    sampler = torch.tensor([[-0.1, -1e4]])  # masked-out position with an absurd log ratio
    mask = torch.tensor([[1.0, 0.0]])
    for kind in ("importance_sampling", "ppo"):
        parts = token_loss(LossConfig(kind=kind, kl_coef=0.1), logp, sampler, torch.ones(1, 2), mask)
        parts.per_token.sum().backward()
        assert torch.isfinite(parts.per_token).all() and torch.isfinite(logp.grad).all()
        assert logp.grad[0, 1].item() == 0.0
        logp.grad = None


def test_normalisation_tokens_and_sequences():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss_numerator(per_token, mask, "tokens").item() == pytest.approx(6.0)
    assert loss_denominator(mask, "tokens") == 3.0
    # sequences: (1 + 2) / 2 + 3 / 1 = 4.5 over 2 sequences with a trained token
    assert loss_numerator(per_token, mask, "sequences").item() == pytest.approx(4.5)
    assert loss_denominator(mask, "sequences") == 2.0
    assert masked_mean(per_token, mask) == pytest.approx(2.0)
    assert masked_mean(per_token, torch.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError, match="normalisation"):
        loss_numerator(per_token, mask, "batch")


def _datum(n: int, start: int = 1) -> Datum:
    return Datum(
        tokens=list(range(start, start + n)),
        loss_mask=[0.0] + [1.0] * (n - 1),
        advantages=[0.5] * n,
        sampler_logprobs=[-1.0] * n,
    )


def test_collate_right_pads_and_masks():
    batch = collate([_datum(3), _datum(5, start=10)], pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 0, 0], [10, 11, 12, 13, 14]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.lengths == (3, 5)
    assert batch.sampler_logprobs[0].tolist() == [-1, -1, -1, 0, 0]


def test_collate_rejects_misaligned_data():
    bad = Datum(tokens=[1, 2, 3], loss_mask=[0.0, 1.0], advantages=[0.0] * 3, sampler_logprobs=[0.0] * 3)
    with pytest.raises(ConfigError, match="datum 1: loss_mask has 2 entries but tokens has 3"):
        collate([_datum(3), bad])
    first_trained = Datum(tokens=[1, 2], loss_mask=[1.0, 1.0], advantages=[0.0] * 2, sampler_logprobs=[0.0] * 2)
    with pytest.raises(ConfigError, match="loss_mask\\[0\\]"):
        collate([first_trained])
    with pytest.raises(ConfigError, match="at least one datum"):
        collate([])


def test_micro_batches_keep_order():
    data = [_datum(2, start=i) for i in range(5)]
    chunks = list(micro_batches(data, 2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [d.tokens[0] for c in chunks for d in c] == [0, 1, 2, 3, 4]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=2, max_size=8), min_size=1, max_size=4).filter(
    lambda groups: len({len(g) for g in groups}) == 1))
def test_grpo_advantages_are_centred_and_scaled_per_group(groups):
    rewards = torch.tensor(groups)  # (N, G)
    adv = group_advantages(rewards, "grpo")
    centred = group_advantages(rewards, "grpo_no_std")
    torch.testing.assert_close(centred.mean(dim=1), torch.zeros(len(groups)), atol=1e-4, rtol=0)
    for row, std in zip(adv, rewards.std(dim=1, correction=0)):
        if std > 1e-2:  # a group with spread: unit (population) std
            assert row.std(correction=0).item() == pytest.approx(1.0, rel=1e-3)
        else:
            assert row.abs().max().item() <= row.numel()  # no blow-up on (nearly) equal rewards
