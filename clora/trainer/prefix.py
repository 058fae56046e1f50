"""The policy forward of one micro-batch: token log-probs (with grad) and entropies, two ways.

``naive_forward``: every row through the whole model and the LM head at every position (the
reference). ``shared_forward``: the rows' shared prefixes computed once (a ``PrefixPlan``, see
clora.trainer.prefix_plan), and the LM head, log-softmax and entropy only where a log-prob is needed.

Shared prefixes use the model's key/value cache (design (a) of docs/trainer.md). Each wave of
segments is one forward of the decoder trunk: its *past* is, per segment, its parent's whole
key/value chain (``index_select`` from the wave that computed it, padded to the wave's longest
chain with masked-out slots), its position ids continue its parent's, and a 2D attention mask
covers [past | own tokens]. The cache's ``torch.cat`` and the ``index_select`` are differentiable,
so a prefix's gradient is the sum of what every row below it sends back through its keys/values,
exactly as if each row had computed it. A hidden state at position ``i - 1`` of any segment on a
row's path predicts token ``i``; the LM head runs once per distinct needed position (a shared
position's logits serve every row below it).

Results are token-aligned (B, T) like ``clora.rl.token_logprobs``: index ``i`` is log p(tokens[i] |
tokens[:i]); positions that were not asked for are 0.0 in the shared forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clora.trainer.lora_layer import SlotRouting
from clora.trainer.prefix_plan import PrefixPlan, plan_prefix_tree
from clora.rl.logprobs import at_least_fp32, token_entropy, token_logprobs

__all__ = ["PolicyForward", "naive_forward", "shared_forward", "prefix_unsupported"]

# Config attributes that put something between the trunk's last hidden state and the logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def prefix_unsupported(model: nn.Module) -> str | None:
    """Why the shared forward cannot run ``model`` exactly (None when it can)."""
    config = getattr(model, "config", None)
    trunk = getattr(model, "base_model", None)
    if config is None or trunk is None or trunk is model or not hasattr(model, "get_output_embeddings"):
        return "not a transformers causal LM with a decoder trunk and an output embedding"
    if model.get_output_embeddings() is None:
        return "the model has no output embedding (LM head)"
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"config.{name} = {value!r} transforms the logits after the LM head"
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return f"attention layers of kinds {sorted(kinds)}; only full attention is supported"
    return None


@dataclass
class PolicyForward:
    """Log-probs of one micro-batch; ``entropy()`` on demand (no grad), computed from the same logits."""

    logp: torch.Tensor  # (B, T), grad flows to the LoRA weights
    positions: dict[int, int]  # slot -> token positions run through the trunk (padding included)
    logit_positions: int  # positions run through the LM head
    _logits: torch.Tensor  # naive: (B, T, V); shared: (U, V) at the distinct needed positions
    _scatter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None)  # rows, cols, inverse

    def entropy(self) -> torch.Tensor:
        """Entropy (nats) of the distribution that predicts each token, (B, T), 0.0 where not computed."""
        with torch.no_grad():
            if self._scatter is None:
                return token_entropy(self._logits.detach())  # (B, T)
            rows, cols, inverse = self._scatter
            logp = torch.log_softmax(at_least_fp32(self._logits.detach()), dim=-1)  # (U, V)
            per_position = -(logp.exp() * logp).sum(-1)  # (U,)
            return torch.zeros_like(self.logp).index_put((rows, cols), per_position.index_select(0, inverse))


def naive_forward(
    model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor, *, autocast: bool, slots: Sequence[int]
) -> PolicyForward:
    """Every row through the whole model, logits at every position (the reference path)."""
    # tokens, attention_mask: (B, T)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    b, t = tokens.shape
    positions: dict[int, int] = {}
    for slot in slots:
        positions[slot] = positions.get(slot, 0) + t
    return PolicyForward(token_logprobs(logits, tokens), positions, b * t, logits)


@dataclass(frozen=True)
class _Wave:
    """One trunk forward's outputs that later waves and the LM head read."""

    hidden: torch.Tensor  # (n, L, H), after the trunk's final norm
    keys: list[torch.Tensor]  # per layer (n, kv_heads, chain, head_dim): past + own keys
    values: list[torch.Tensor]  # per layer, same shape
    mask: torch.Tensor  # (n, chain) int64, 1 where the chain holds a real token


def shared_forward(
    model: nn.Module,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    need: torch.Tensor,
    *,
    device: torch.device,
    pad_id: int,
    autocast: bool,
    slots: Sequence[int],
    routing: SlotRouting | None,
    min_tokens: int,
) -> PolicyForward:
    """Log-probs of the rows of ``tokens`` (B, T) where ``need`` (B, T) bool is True, prefixes
    computed once. ``tokens``, ``need``: right-padded, on the cpu; ``lengths``: each row's real length.

    ``slots``: each row's LoRA slot. With ``routing`` given, each wave (and the LM head) is routed
    row by row to its segments' slots; without, the caller's routing (one slot) applies.
    """
    # tokens, need: (B, T) on cpu
    rows = [tokens[r, :n].tolist() for r, n in enumerate(lengths)]
    plan = plan_prefix_tree(rows, slots, min_tokens=min_tokens)
    trunk, head = model.base_model, model.get_output_embeddings()
    waves: list[_Wave] = []
    wave_of: dict[int, tuple[int, int]] = {}  # segment -> (wave, row in wave)
    for w, members in enumerate(plan.waves):
        for j, s in enumerate(members):
            wave_of[s] = (w, j)
    positions: dict[int, int] = {}
    for members in plan.waves:
        if routing is not None:
            routing.use_rows(torch.tensor([plan.segments[s].slot for s in members]))
        waves.append(_run_wave(trunk, plan, members, tokens, waves, wave_of, device, pad_id, autocast))
        length = max(plan.segments[s].length for s in members)
        for s in members:
            slot = plan.segments[s].slot
            positions[slot] = positions.get(slot, 0) + length
    select = _needed(plan, tokens, need, wave_of, [w.hidden.shape[1] for w in waves])
    hidden_parts, slot_parts, inverse_parts, offset = [], [], [], 0
    for w, (flat, wave_inverse, slot_of) in enumerate(select.per_wave):
        if flat.numel() == 0:
            continue
        hidden = waves[w].hidden
        hidden_parts.append(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(device)))  # (u_w, H)
        slot_parts.append(slot_of)
        inverse_parts.append(wave_inverse + offset)
        offset += flat.numel()
    rows_t, cols_t = select.rows.to(device), select.cols.to(device)
    if not hidden_parts:  # nothing asked for
        logits = torch.zeros((0, 1), device=device)
        logp = torch.zeros(need.shape, device=device)
        return PolicyForward(logp, positions, 0, logits, (rows_t, cols_t, torch.zeros(0, dtype=torch.int64, device=device)))
    if routing is not None:
        routing.use_rows(torch.cat(slot_parts))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = head(torch.cat(hidden_parts))  # (U, V)
    logits32 = at_least_fp32(logits)  # (U, V), no copy when already fp32
    inverse = torch.cat(inverse_parts).to(device)  # (N,) needed position -> distinct position
    vocab = logits32.shape[-1]
    picked = logits32.reshape(-1).index_select(0, inverse * vocab + select.tokens.to(device))  # (N,)
    logp_needed = picked - torch.logsumexp(logits32, dim=-1).index_select(0, inverse)  # (N,)
    logp = torch.zeros(need.shape, device=device, dtype=logp_needed.dtype).index_put((rows_t, cols_t), logp_needed)
    return PolicyForward(logp, positions, int(logits.shape[0]), logits, (rows_t, cols_t, inverse))


def _run_wave(
    trunk: nn.Module,
    plan: PrefixPlan,
    members: tuple[int, ...],
    all_tokens: torch.Tensor,
    done: list[_Wave],
    wave_of: dict[int, tuple[int, int]],
    device: torch.device,
    pad_id: int,
    autocast: bool,
) -> _Wave:
    """One trunk forward over the segments ``members``, each after its parent's key/value chain."""
    from transformers import DynamicCache

    segments = [plan.segments[s] for s in members]
    n, length = len(segments), max(seg.length for seg in segments)
    tokens = torch.full((n, length), pad_id, dtype=torch.int64)  # (n, L)
    own_mask = torch.zeros((n, length), dtype=torch.int64)  # (n, L)
    for j, seg in enumerate(segments):
        tokens[j, : seg.length] = all_tokens[seg.row, seg.start : seg.stop]
        own_mask[j, : seg.length] = 1
    starts = torch.tensor([seg.start for seg in segments], dtype=torch.int64)  # (n,)
    position_ids = starts[:, None] + torch.arange(length)[None, :]  # (n, L)
    cache = DynamicCache()
    mask = own_mask
    parents = [seg.parent for seg in segments]
    if any(p is not None for p in parents):
        past_keys, past_values, past_mask = _gather_past(parents, done, wave_of, device)
        for layer, (k, v) in enumerate(zip(past_keys, past_values, strict=True)):
            cache.update(k, v, layer)
        mask = torch.cat([past_mask.cpu(), own_mask], dim=1)  # (n, chain + L)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = trunk(
            input_ids=tokens.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=True,
        )
    return _Wave(
        hidden=out.last_hidden_state,  # (n, L, H)
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        mask=mask.to(device),
    )


def _gather_past(
    parents: list[int | None], done: list[_Wave], wave_of: dict[int, tuple[int, int]], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each segment's parent chain (keys, values per layer, (n, chain) mask), padded to the longest."""
    sources = sorted({wave_of[p][0] for p in parents if p is not None})
    chain = max(done[w].mask.shape[1] for w in sources)
    base: dict[int, int] = {}  # source wave -> its first row in the stacked sources
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
    pad = (0, extra) if dim == -1 else (0, 0, 0, extra)
    return nn.functional.pad(t, pad)


@dataclass(frozen=True)
class _Selection:
    rows: torch.Tensor  # (N,) row of each needed position
    cols: torch.Tensor  # (N,) position i (the token predicted from hidden state i - 1)
    tokens: torch.Tensor  # (N,) tokens[row][i]
    per_wave: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (distinct flat hidden index, inverse, slots)


def _needed(
    plan: PrefixPlan, tokens: torch.Tensor, need: torch.Tensor, wave_of: dict[int, tuple[int, int]], lengths: list[int]
) -> _Selection:
    """Where each needed prediction's hidden state is: (wave, flat index in its (n * L) hidden states)."""
    # tokens, need: (B, T) on cpu
    found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in lengths]  # flat, rows, cols
    for r, path in enumerate(plan.paths):
        for s in path:
            seg = plan.segments[s]
            w, j = wave_of[s]
            # hidden states at positions [start, stop) predict tokens [start + 1, stop + 1)
            cols = need[r, seg.start + 1 : seg.stop + 1].nonzero().squeeze(1) + seg.start + 1  # (k,)
            if cols.numel():
                flat = j * lengths[w] + (cols - 1 - seg.start)  # (k,)
                found[w].append((flat, torch.full_like(cols, r), cols))
    rows_all, cols_all, per_wave = [], [], []
    for w, parts in enumerate(found):
        if not parts:
            per_wave.append((torch.zeros(0, dtype=torch.int64),) * 3)
            continue
        flat = torch.cat([p[0] for p in parts])
        rows_all.append(torch.cat([p[1] for p in parts]))
        cols_all.append(torch.cat([p[2] for p in parts]))
        distinct, inverse = torch.unique(flat, return_inverse=True)  # sorted: row order kept within the wave
        wave_slots = torch.tensor([plan.segments[s].slot for s in plan.waves[w]])  # (n,)
        per_wave.append((distinct, inverse, wave_slots.index_select(0, distinct // lengths[w])))
    rows_t = torch.cat(rows_all) if rows_all else torch.zeros(0, dtype=torch.int64)
    cols_t = torch.cat(cols_all) if cols_all else torch.zeros(0, dtype=torch.int64)
    return _Selection(rows=rows_t, cols=cols_t, tokens=tokens[rows_t, cols_t], per_wave=per_wave)
