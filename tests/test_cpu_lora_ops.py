"""clora's grouped CPU LoRA ops against vLLM's own torch ops, and the plugin that installs them."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from clora.sampler import cpu_lora_ops as grouped

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")
punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

SLOTS, IN, OUT, RANK = 4, 24, 40, 6


def _weights(out: int, inp: int, *, four_dim: bool = False, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(SLOTS, out, inp, generator=gen)  # [L, out, in]
    return w.unsqueeze(1) if four_dim else w  # [L, 1, out, in] is how vLLM stacks them


def _inputs(rows: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


MIXED = torch.tensor([2, 0, 2, 3, 1, 1, 0, 2])
SAME = torch.tensor([1, 1, 1, 1, 1])


@pytest.mark.parametrize("indices", [MIXED, SAME], ids=["mixed", "one-adapter"])
@pytest.mark.parametrize("four_dim", [False, True])
def test_shrink_matches_vllm(indices, four_dim):
    x, w = _inputs(len(indices), IN), _weights(RANK, IN, four_dim=four_dim)
    expected, actual = torch.zeros(len(indices), RANK), torch.zeros(len(indices), RANK)
    torch_ops.bgmv_shrink(x, w, expected, indices, 0.5)
    grouped.bgmv_shrink(x, w, actual, indices, 0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("indices", [MIXED, SAME], ids=["mixed", "one-adapter"])
def test_expand_matches_vllm(indices, add_inputs):
    x, w = _inputs(len(indices), RANK), _weights(OUT, RANK, four_dim=True)
    start = _inputs(len(indices), OUT + 3, seed=5)  # the model pads its output wider than the adapter
    expected, actual = start.clone(), start.clone()
    torch_ops.bgmv_expand(x, w, expected, indices, add_inputs)
    grouped.bgmv_expand(x, w, actual, indices, add_inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_matches_vllm(add_inputs):
    x, w = _inputs(len(MIXED), RANK), _weights(OUT, RANK)
    start = _inputs(len(MIXED), 3 * OUT, seed=6)
    expected, actual = start.clone(), start.clone()
    torch_ops.bgmv_expand_slice(x, w, expected, MIXED, OUT, OUT, add_inputs)
    grouped.bgmv_expand_slice(x, w, actual, MIXED, OUT, OUT, add_inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[:, :OUT], start[:, :OUT], rtol=0, atol=0)  # outside the slice: untouched


def test_prefill_ops_explode_one_index_per_sequence_to_its_tokens():
    seq_lens, seq_indices = torch.tensor([3, 1, 4]), torch.tensor([2, 0, 3])
    tokens = int(seq_lens.sum())
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    x, w = _inputs(tokens, IN), _weights(RANK, IN)
    meta = (starts, seq_lens, seq_indices, 3, 4, tokens)
    expected, actual = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    torch_ops.sgmv_shrink(x, w, expected, *meta, 2.0)
    grouped.sgmv_shrink(x, w, actual, *meta, 2.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    xb, wb = _inputs(tokens, RANK), _weights(OUT, RANK)
    expected, actual = torch.ones(tokens, 2 * OUT), torch.ones(tokens, 2 * OUT)
    torch_ops.sgmv_expand_slice(xb, wb, expected, *meta, OUT, OUT, True)
    grouped.sgmv_expand_slice(xb, wb, actual, *meta, OUT, OUT, True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    expected, actual = torch.zeros(tokens, OUT), torch.zeros(tokens, OUT)
    torch_ops.sgmv_expand(xb, wb, expected, *meta, False)
    grouped.sgmv_expand(xb, wb, actual, *meta, False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rows_without_adapter_get_no_lora_contribution():
    """vLLM's op gives index -1 the LAST slot's weights (the mixed-batch bug); the grouped op gives nothing."""
    indices = torch.tensor([1, -1, 3, -1])
    x, w = _inputs(4, IN), _weights(RANK, IN)
    shrunk = torch.full((4, RANK), 7.0)
    grouped.bgmv_shrink(x, w, shrunk, indices, 1.0)
    assert torch.equal(shrunk[1], torch.zeros(RANK)) and torch.equal(shrunk[3], torch.zeros(RANK))
    torch.testing.assert_close(shrunk[2], x[2] @ w[3].T)
    buggy = torch.zeros(4, RANK)
    torch_ops.bgmv_shrink(x, w, buggy, indices, 1.0)
    torch.testing.assert_close(buggy[1], x[1] @ w[SLOTS - 1].T)  # the bug this module exists to avoid

    start = _inputs(4, OUT, seed=9)
    expanded = start.clone()
    grouped.bgmv_expand(_inputs(4, RANK), _weights(OUT, RANK), expanded, indices, True)
    assert torch.equal(expanded[1], start[1]) and torch.equal(expanded[3], start[3])
    assert not torch.equal(expanded[0], start[0])

    only_base = torch.full((2, RANK), 3.0)
    grouped.bgmv_shrink(_inputs(2, IN), w, only_base, torch.tensor([-1, -1]), 1.0)
    assert torch.equal(only_base, torch.zeros(2, RANK))


def test_bf16_inputs_follow_the_output_dtype_like_vllm():
    x, w = _inputs(len(MIXED), IN).bfloat16(), _weights(RANK, IN).bfloat16()
    expected, actual = torch.zeros(len(MIXED), RANK), torch.zeros(len(MIXED), RANK)  # fp32 output buffer
    torch_ops.bgmv_shrink(x, w, expected, MIXED, 1.0)
    grouped.bgmv_shrink(x, w, actual, MIXED, 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_install_points_the_cpu_punica_wrapper_at_the_grouped_ops(monkeypatch):
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(torch_ops, name))  # restored after the test
    monkeypatch.delenv(grouped.ENV_FLAG, raising=False)
    grouped.register()
    assert punica_cpu.bgmv_shrink is torch_ops.bgmv_shrink  # without the flag the plugin does nothing
    monkeypatch.setenv(grouped.ENV_FLAG, "1")
    grouped.register()
    assert punica_cpu.bgmv_shrink is grouped.bgmv_shrink
    assert punica_cpu.sgmv_expand_slice is grouped.sgmv_expand_slice


def test_the_plugin_is_registered_for_vllm_processes():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("clora_cpu_lora_ops") == "clora.sampler.cpu_lora_ops:register"


def test_engines_send_base_rows_without_lora_only_when_the_ops_are_on(monkeypatch):
    monkeypatch.setenv(grouped.ENV_FLAG, "1")
    assert grouped.active_for_new_engines()
    monkeypatch.setenv(grouped.ENV_FLAG, "0")  # a user who turns the ops off gets the zero-adapter path
    assert not grouped.active_for_new_engines()
