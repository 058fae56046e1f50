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
    cispo_loss,
    collate,
    cross_entropy_loss,
    group_advantages,
    importance_sampling_loss,
    kl_k1,
    kl_k1_mean,
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


def test_cispo_by_hand():
    """CISPO: -sg(clip(r, 0.8, 1.2)) * A * logp: the weight is clipped, the gradient never dropped."""
    # ratios 2, 0.5, 1.1, 2 with advantages 1, -1, 1, -1 (the PPO example above)
    logp = _logp(0.5, 0.25, 0.55, 0.5).requires_grad_(True)
    sampler = _logp(0.25, 0.5, 0.5, 0.25)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = cispo_loss(logp, sampler, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.2)
    # weights 1.2, 0.8, 1.1, 1.2: 1.2 ln2, 0.8 ln(1/4) = -1.6 ln2, -1.1 ln(0.55), -1.2 ln2
    expected = torch.tensor([[1.2 * LN2, -1.6 * LN2, -1.1 * math.log(0.55), -1.2 * LN2]])
    torch.testing.assert_close(loss.detach(), expected)
    assert clipped.tolist() == [[True, True, False, True]]  # the weight is clipped whatever A's sign
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2, 0.8, -1.1, 1.2]]))  # -weight * A, clipped too


def test_cispo_without_lower_bound_is_trl_cispo():
    """clip_low >= 1 drops the lower bound (MiniMax-M1); TRL's cispo weight is min(r, epsilon_high)."""
    logp = _logp(0.01, 0.5, 0.9)
    sampler = _logp(0.5, 0.05, 0.9)  # ratios 0.02, 10, 1
    adv, mask = torch.tensor([[1.0, 2.0, -1.0]]), torch.ones(1, 3)
    loss, clipped = cispo_loss(logp, sampler, adv, mask, clip_low=1.0, clip_high=4.0)
    trl_weight = (logp - sampler).exp().clamp(max=5.0)  # TRL: epsilon_high = 5.0
    torch.testing.assert_close(loss, -trl_weight * adv * logp)
    assert clipped.tolist() == [[False, True, False]]


def test_token_loss_cispo_kind_and_clip_fraction():
    logp, sampler = _logp(0.5, 0.3), _logp(0.25, 0.3)  # ratio 2, then 1
    parts = token_loss(LossConfig(kind="cispo", clip_high=0.5), logp, sampler, torch.ones(1, 2), torch.ones(1, 2))
    torch.testing.assert_close(parts.per_token, torch.tensor([[1.5 * LN2, math.log(0.3) * -1.0]]))
    assert parts.clipped.tolist() == [[True, False]]


def test_kl_k3_to_base_penalty_by_hand():
    """k3 of KL(trainer || base) on the trainer's tokens: b - 1 - log b with b = pi_base / pi_trainer,
    added to the policy loss, its gradient kl_coef * (1 - b) through the trainer's log-prob."""
    logp = _logp(0.5).requires_grad_(True)
    sampler, base = _logp(0.25), _logp(0.25)  # ratio 2 (PPO clips it: no policy gradient); b = 0.5
    adv, mask = torch.tensor([[1.0]]), torch.ones(1, 1)
    k3 = 0.5 - 1.0 - math.log(0.5)
    parts = token_loss(LossConfig(kind="ppo", kl_coef=0.5), logp, sampler, adv, mask, base_logp=base)
    assert parts.kl.item() == pytest.approx(k3)
    assert parts.per_token.item() == pytest.approx(-1.2 + 0.5 * k3)
    assert parts.kl_sampler.item() == pytest.approx(2.0 - 1.0 - LN2)  # the sampler diagnostic is separate
    parts.per_token.sum().backward()
    assert logp.grad.item() == pytest.approx(0.5 * (1.0 - 0.5))
    torch.testing.assert_close(kl_k3(base, logp.detach(), mask), torch.tensor([[k3]]))
    is_parts = token_loss(LossConfig(kind="importance_sampling", kl_coef=0.5), _logp(0.5), sampler, adv, mask,
                          base_logp=base)
    assert is_parts.per_token.item() == pytest.approx(-2.0 + 0.5 * k3)
    with pytest.raises(ValueError, match="base model's log-probs"):
        token_loss(LossConfig(kl_coef=0.5), logp, sampler, adv, mask)
    no_kl = token_loss(LossConfig(kind="ppo"), logp, sampler, adv, mask, base_logp=base)
    assert no_kl.per_token.item() == pytest.approx(-1.2) and no_kl.kl.item() == 0.0


def test_kl_k1_shapes_the_advantages_by_hand():
    """k1 (tinker-cookbook's kl_penalty_coef): A' = A + kl_coef * (mean k1 - k1), k1 = log pi_sampler - log pi_base."""
    sampler = _logp(0.25, 0.5)
    base = _logp(0.125, 0.5)  # k1 = ln 2, 0
    mask = torch.ones(1, 2)
    torch.testing.assert_close(kl_k1(sampler, base, mask), torch.tensor([[LN2, 0.0]]))
    total, weight = kl_k1_mean(sampler, base, mask)
    assert (total, weight) == (pytest.approx(LN2), 2.0)
    logp = sampler.clone().requires_grad_(True)  # on-policy: ratio 1, so the IS loss is -A'
    cfg = LossConfig(kind="importance_sampling", kl_coef=0.5, kl_estimator="k1")
    parts = token_loss(cfg, logp, sampler, torch.ones(1, 2), mask, base_logp=base, kl_baseline=total / weight)
    shift = 0.5 * LN2 / 2  # kl_coef * (mean - k1) = -/+ 0.5 * ln2 / 2
    torch.testing.assert_close(parts.per_token.detach(), torch.tensor([[-(1.0 - shift), -(1.0 + shift)]]))
    torch.testing.assert_close(parts.kl, torch.tensor([[LN2, 0.0]]))
    parts.per_token.sum().backward()  # the penalty is data: the gradient is -A' * ratio, nothing from the KL itself
    torch.testing.assert_close(logp.grad, torch.tensor([[-(1.0 - shift), -(1.0 + shift)]]))


def test_cross_entropy_takes_no_kl_penalty():
    with pytest.raises(ConfigError, match="loss.kl_coef: must be 0 for kind 'cross_entropy'"):
        LossConfig(kind="cross_entropy", kl_coef=0.5)
    logp, sampler = _logp(0.5), _logp(0.25)
    parts = token_loss(LossConfig(kind="cross_entropy"), logp, sampler, torch.ones(1, 1), torch.ones(1, 1))
    assert parts.per_token.item() == pytest.approx(LN2)


def test_masked_out_extreme_values_give_finite_loss_and_gradients():
    logp = torch.tensor([[-0.1, -0.2]], requires_grad=True)
    sampler = torch.tensor([[-0.1, -1e4]])  # masked-out position with an absurd log ratio
    base = torch.tensor([[-0.3, -1e4]])
    mask = torch.tensor([[1.0, 0.0]])
    for kind in ("importance_sampling", "ppo", "cispo"):
        for estimator in ("k3", "k1"):
            cfg = LossConfig(kind=kind, kl_coef=0.1, kl_estimator=estimator)
            parts = token_loss(cfg, logp, sampler, torch.ones(1, 2), mask, base_logp=base)
            parts.per_token.sum().backward()
            assert torch.isfinite(parts.per_token).all() and torch.isfinite(logp.grad).all()
            assert torch.isfinite(parts.kl).all() and parts.kl[0, 1].item() == 0.0
            assert logp.grad[0, 1].item() == 0.0
            logp.grad = None


def test_normalisation_tokens_sequences_and_constant():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss_numerator(per_token, mask, "tokens").item() == pytest.approx(6.0)
    assert loss_denominator(mask, "tokens") == 3.0
    # sequences: (1 + 2) / 2 + 3 / 1 = 4.5 over 2 sequences with a trained token
    assert loss_numerator(per_token, mask, "sequences").item() == pytest.approx(4.5)
    assert loss_denominator(mask, "sequences") == 2.0
    # constant (Dr. GRPO): the token sum 6 over 3 sequences (every row) * 10 tokens each
    assert loss_numerator(per_token, mask, "constant").item() == pytest.approx(6.0)
    assert loss_denominator(mask, "constant", 10.0) == 30.0
    with pytest.raises(ValueError, match="constant > 0"):
        loss_denominator(mask, "constant")
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
