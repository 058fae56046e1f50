"""Tiny training data and bit-exact trainer state, for tests of training without a sampler.

``make_data`` builds random ``Datum`` lists (what a tenant's ``train_step`` takes); ``with_nonfinite``
spoils one so a step must be rejected; ``store_state`` / ``assert_same_state`` compare an
``AdapterStore`` (weights, optimizer moments, counters) bit for bit.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from clora.messages import Datum

__all__ = ["make_data", "with_nonfinite", "store_state", "assert_same_state"]


def make_data(n: int, seed: int, *, vocab: int = 700, min_len: int = 12, max_len: int = 40) -> list[Datum]:
    """``n`` random sequences of token ids below ``vocab``: a prompt (not trained on), then a completion
    with one advantage per sequence and sampler log-probs near -6.6 (uniform guessing over ~700
    tokens), so importance ratios on a tiny random model stay near 1."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        prompt = rng.randint(2, length // 2)
        adv = rng.choice([-1.0, -0.5, 0.5, 1.0])
        data.append(
            Datum(
                tokens=[rng.randrange(vocab) for _ in range(length)],
                loss_mask=[0.0] * prompt + [1.0] * (length - prompt),
                advantages=[0.0] * prompt + [adv] * (length - prompt),
                sampler_logprobs=[0.0] * prompt + [-6.6 + rng.uniform(-0.3, 0.3) for _ in range(length - prompt)],
            )
        )
    return data


def with_nonfinite(data: list[Datum], how: Literal["nan_advantage", "inf_sampler_logprob"]) -> list[Datum]:
    """``data`` with its last datum's first trained position made non-finite.

    ``"nan_advantage"``: a NaN advantage, so the loss is NaN. ``"inf_sampler_logprob"``: a -inf sampler
    log-prob (advantages made positive), so PPO clips the infinite ratio: the loss stays finite but
    the gradient is NaN.
    """
    d = data[-1]
    i = d.loss_mask.index(1.0)
    if how == "nan_advantage":
        d = Datum(tokens=d.tokens, loss_mask=d.loss_mask, sampler_logprobs=d.sampler_logprobs,
                  advantages=d.advantages[:i] + [float("nan")] + d.advantages[i + 1:])
    elif how == "inf_sampler_logprob":
        d = Datum(tokens=d.tokens, loss_mask=d.loss_mask, advantages=[abs(a) for a in d.advantages],
                  sampler_logprobs=d.sampler_logprobs[:i] + [float("-inf")] + d.sampler_logprobs[i + 1:])
    else:
        raise ValueError(f"how must be 'nan_advantage' or 'inf_sampler_logprob', got {how!r}")
    return [*data[:-1], d]


def store_state(store: Any) -> dict[str, Any]:
    """Every value of an ``AdapterStore`` (tensors cloned), for bit-exact comparisons."""
    tensors = {
        f"{part}:{k}": t.clone()
        for part in ("params", "exp_avg", "exp_avg_sq", "grads")
        for k, t in getattr(store, part).items()
    }
    return {**tensors, "step": store.step, "adam_step": store.adam_step, "grad_weight": store.grad_weight,
            "grad_normalize": store.grad_normalize}


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """AssertionError naming the first key where two ``store_state`` results differ (tensors bit for bit)."""
    import torch

    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
