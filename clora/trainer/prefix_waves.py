"""One wave of a prefix plan through the decoder trunk, and where needed predictions sit in the waves.

A wave is one trunk forward over segments (clora.trainer.prefix_plan). Each segment runs after its
parent's whole key/value chain: the chains are ``index_select``-ed from the waves that computed
them and padded to the longest with masked-out slots; a segment's position ids continue its
parent's; the 2D attention mask covers [chain | own tokens]. The cache's ``torch.cat`` and the
``index_select`` are differentiable, so a prefix receives the sum of what every row below it sends
back through its keys/values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clora.trainer.prefix_plan import PrefixPlan

__all__ = ["Wave", "run_wave", "Selection", "needed_positions"]


@dataclass(frozen=True)
class Wave:
    """One trunk forward's outputs that later waves and the LM head read."""

    hidden: torch.Tensor  # (n, L, H), after the trunk's final norm
    keys: list[torch.Tensor]  # per layer (n, kv_heads, chain, head_dim): the parents' chain + own keys
    values: list[torch.Tensor]  # per layer, same shape
    mask: torch.Tensor  # (n, chain) int64 on the device, 1 where the chain holds a real token

    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden, *self.keys, *self.values]

    def detached(self) -> Wave:
        """Leaf copies (same storage) that collect the gradient later waves send back."""
        leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
        return Wave(leaf(self.hidden), [leaf(k) for k in self.keys], [leaf(v) for v in self.values], self.mask)


def run_wave(
    trunk: nn.Module,
    plan: PrefixPlan,
    members: Sequence[int],
    rows: Sequence[Sequence[int]],
    done: list[Wave],
    wave_of: dict[int, tuple[int, int]],
    *,
    device: torch.device,
    pad_id: int,
    autocast: bool,
) -> Wave:
    """One trunk forward over the segments ``members`` (right-padded), each after its parent's chain
    (found through ``wave_of``: segment -> (wave in ``done``, row in that wave))."""
    from transformers import DynamicCache

    segments = [plan.segments[s] for s in members]
    n, length = len(segments), max(seg.length for seg in segments)
    tokens = torch.full((n, length), pad_id, dtype=torch.int64)  # (n, L)
    own_mask = torch.zeros((n, length), dtype=torch.int64)  # (n, L)
    for j, seg in enumerate(segments):
        tokens[j, : seg.length] = torch.tensor(rows[seg.row][seg.start : seg.stop], dtype=torch.int64)
        own_mask[j, : seg.length] = 1
    starts = torch.tensor([seg.start for seg in segments], dtype=torch.int64)  # (n,)
    position_ids = starts[:, None] + torch.arange(length)[None, :]  # (n, L)
    cache = DynamicCache()
    mask = own_mask.to(device)
    parents = [seg.parent for seg in segments]
    if any(p is not None for p in parents):
        past_keys, past_values, past_mask = _gather_chains(parents, done, wave_of, device)
        for layer, (k, v) in enumerate(zip(past_keys, past_values, strict=True)):
            cache.update(k, v, layer)
        mask = torch.cat([past_mask, mask], dim=1)  # (n, chain + L)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = trunk(
            input_ids=tokens.to(device),
            attention_mask=mask,
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=True,
        )
    return Wave(
        hidden=out.last_hidden_state,  # (n, L, H)
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        mask=mask,
    )


def _gather_chains(
    parents: list[int | None], done: list[Wave], wave_of: dict[int, tuple[int, int]], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each segment's parent chain (keys, values per layer, (n, chain) mask), padded to the longest."""
    sources = sorted({wave_of[p][0] for p in parents if p is not None})
    chain = max(done[w].mask.shape[1] for w in sources)
    base: dict[int, int] = {}  # source wave -> its first row among the stacked sources
    total = 0
    for w in sources:
        base[w] = total
        total += done[w].mask.shape[0]
    # a parentless segment reads an all-masked row appended after the sources
    index = torch.tensor(
        [total if p is None else base[wave_of[p][0]] + wave_of[p][1] for p in parents], device=device
    )  # (n,)
    orphan = any(p is None for p in parents)

    def stack(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        padded = [_pad_to(t, chain, dim) for t in parts]
        if orphan:
            padded.append(padded[0].new_zeros((1, *padded[0].shape[1:])))
        whole = padded[0] if len(padded) == 1 else torch.cat(padded)
        return whole.index_select(0, index)

    n_layers = len(done[sources[0]].keys)
    keys = [stack([done[w].keys[layer] for w in sources], -2) for layer in range(n_layers)]
    values = [stack([done[w].values[layer] for w in sources], -2) for layer in range(n_layers)]
    mask = stack([done[w].mask for w in sources], -1)  # (n, chain)
    return keys, values, mask


def _pad_to(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` (-1 or -2) to ``length``."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    return nn.functional.pad(t, (0, extra) if dim == -1 else (0, 0, 0, extra))


@dataclass(frozen=True)
class Selection:
    """The needed predictions of a micro-batch, and the distinct hidden states they come from."""

    rows: torch.Tensor  # (N,) micro-batch row of each needed prediction
    cols: torch.Tensor  # (N,) position i (token i is predicted from hidden state i - 1)
    tokens: torch.Tensor  # (N,) the predicted token
    per_wave: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (distinct flat index, inverse, slot)


def needed_positions(
    plan: PrefixPlan,
    batch_rows: Sequence[int],
    rows: Sequence[Sequence[int]],
    need: torch.Tensor,
    wave_of: dict[int, tuple[int, int]],
    lengths: list[int],
) -> Selection:
    """For micro-batch row j (plan row ``batch_rows[j]``) and each i with ``need[j, i]``: the wave and
    flat index (row * L + position) of hidden state i - 1; ``lengths``: each wave's padded length."""
    # need: (b, T) bool on cpu
    found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in lengths]  # flat, rows, cols
    tokens: list[torch.Tensor] = [[] for _ in lengths]  # type: ignore[misc]
    for j, r in enumerate(batch_rows):
        row_tokens = torch.tensor(rows[r], dtype=torch.int64)
        for s in plan.paths[r]:
            seg = plan.segments[s]
            w, k = wave_of[s]
            # hidden states at positions [start, stop) predict tokens [start + 1, stop + 1)
            cols = need[j, seg.start + 1 : seg.stop + 1].nonzero().squeeze(1) + seg.start + 1  # (m,)
            if cols.numel():
                found[w].append((k * lengths[w] + (cols - 1 - seg.start), torch.full_like(cols, j), cols))
                tokens[w].append(row_tokens.index_select(0, cols))
    rows_all, cols_all, tokens_all, per_wave = [], [], [], []
    for w, parts in enumerate(found):
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            per_wave.append((empty, empty, empty))
            continue
        flat = torch.cat([p[0] for p in parts])
        rows_all.append(torch.cat([p[1] for p in parts]))
        cols_all.append(torch.cat([p[2] for p in parts]))
        tokens_all.append(torch.cat(tokens[w]))
        distinct, inverse = torch.unique(flat, return_inverse=True)  # sorted: row order kept within a wave
        members = plan.waves[w] if w < len(plan.waves) - 1 else [plan.paths[r][-1] for r in batch_rows]
        wave_slots = torch.tensor([plan.segments[s].slot for s in members])  # (n,)
        per_wave.append((distinct, inverse, wave_slots.index_select(0, distinct // lengths[w])))
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    return Selection(rows=cat(rows_all), cols=cat(cols_all), tokens=cat(tokens_all), per_wave=per_wave)
