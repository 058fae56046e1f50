"""The policy forward of a training call: token log-probs (with grad) and entropies, two ways.

``naive_forward``: one micro-batch, every row through the whole model and the LM head at every
position (the reference). ``SharedPrefixStep``: the token prefixes the call's rows share (a
``PrefixPlan`` over *all* its rows, see clora.trainer.prefix_plan) computed once per call, then each
micro-batch's own segments (the plan's leaves) against them, and the LM head, log-softmax and
entropy only where a log-prob is needed.

Design (a) of docs/trainer.md, with the model's key/value cache (clora.trainer.prefix_waves). The
shared waves run first, with grad; micro-batches read *leaf copies* of their outputs (keys, values,
hidden states), so each micro-batch's backward stops there and leaves the gradient for the prefixes
in those copies' ``.grad``, summed over micro-batches; ``backward()`` then sends it through the
shared waves once. The sum is the same as every row computing its prefix itself (rounding aside).

A hidden state at position ``i - 1`` of any segment on a row's path predicts token ``i``; the LM
head runs once per distinct needed position of a micro-batch (a shared position's logits serve every
row below it). Results are token-aligned (B, T) like ``clora.rl.token_logprobs``: index ``i`` is
log p(tokens[i] | tokens[:i]); positions that were not asked for are 0.0 on the shared path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clora.rl.logprobs import at_least_fp32, token_entropy, token_logprobs
from clora.trainer.lora_layer import SlotRouting
from clora.trainer.prefix_plan import PrefixPlan, plan_prefix_tree
from clora.trainer.prefix_waves import Wave, needed_positions, run_wave

__all__ = ["PolicyForward", "naive_forward", "SharedPrefixStep", "PrefixRunner", "prefix_unsupported"]

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
    logit_positions: dict[int, int]  # slot -> positions run through the LM head
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
    positions: dict[int, int] = {}
    for slot in slots:
        positions[slot] = positions.get(slot, 0) + tokens.shape[1]
    return PolicyForward(token_logprobs(logits, tokens), positions, dict(positions), logits)


class SharedPrefixStep:
    """A call's rows with their shared prefixes computed once; log-probs micro-batch by micro-batch.

    ``rows``: every row's tokens; ``slots``: each row's LoRA slot. With ``routing`` given, each wave
    and the LM head are routed row by row to the segments' slots (fused steps); without, the caller's
    routing (one slot) applies. Built with ``grad``: call ``backward()`` once, after the last
    micro-batch's own backward. ``positions``: slot -> positions the shared waves ran (once per call).
    """

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[Sequence[int]],
        slots: Sequence[int],
        *,
        device: torch.device,
        pad_id: int,
        autocast: bool,
        routing: SlotRouting | None,
        min_tokens: int,
        grad: bool,
        plan: PrefixPlan | None = None,
    ) -> None:
        """``plan``: the prefix plan of ``rows``, when the caller has made it already."""
        self.model, self.rows, self.routing = model, rows, routing
        self.device, self.pad_id, self.autocast = device, pad_id, autocast
        self.plan = plan = plan or plan_prefix_tree(rows, slots, min_tokens=min_tokens)
        self._wave_of = {s: (w, j) for w, members in enumerate(plan.waves[:-1]) for j, s in enumerate(members)}
        self.positions: dict[int, int] = {}
        computed: list[Wave] = []
        for members in plan.waves[:-1]:
            computed.append(self._wave(members, computed, self._wave_of, self.positions))
        self._computed = computed
        self._shared = [w.detached() for w in computed] if grad else computed

    def _wave(
        self, members: Sequence[int], done: list[Wave], wave_of: dict[int, tuple[int, int]], positions: dict[int, int]
    ) -> Wave:
        """Run one wave; count its positions (padding included) per slot into ``positions``."""
        segments = [self.plan.segments[s] for s in members]
        if self.routing is not None:
            self.routing.use_rows(torch.tensor([seg.slot for seg in segments]))
        length = max(seg.length for seg in segments)
        for seg in segments:
            positions[seg.slot] = positions.get(seg.slot, 0) + length
        return run_wave(
            self.model.base_model, self.plan, members, self.rows, done, wave_of,
            device=self.device, pad_id=self.pad_id, autocast=self.autocast,
        )

    def forward(self, batch_rows: Sequence[int], need: torch.Tensor) -> PolicyForward:
        """Log-probs (b, T) of the rows ``batch_rows`` (indices into ``rows``, a micro-batch) where
        ``need`` (b, T) bool on the cpu is True. ``positions``: this micro-batch's own waves."""
        leaves = [self.plan.paths[r][-1] for r in batch_rows]
        wave_of = {**self._wave_of, **{s: (len(self._shared), j) for j, s in enumerate(leaves)}}
        positions: dict[int, int] = {}
        waves = [*self._shared, self._wave(leaves, self._shared, wave_of, positions)]
        select = needed_positions(self.plan, batch_rows, self.rows, need, wave_of, [w.hidden.shape[1] for w in waves])
        hidden_parts, slot_parts, inverse_parts, offset = [], [], [], 0
        for wave, (flat, inverse, slots) in zip(waves, select.per_wave, strict=True):
            if flat.numel():
                hidden = wave.hidden.reshape(-1, wave.hidden.shape[-1])  # (n * L, H)
                hidden_parts.append(hidden.index_select(0, flat.to(self.device)))  # (u_w, H)
                slot_parts.append(slots)
                inverse_parts.append(inverse + offset)
                offset += flat.numel()
        rows, cols = select.rows.to(self.device), select.cols.to(self.device)
        if not hidden_parts:  # nothing asked for
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return PolicyForward(torch.zeros(need.shape, device=self.device), positions, {},
                                 torch.zeros((0, 1), device=self.device), (rows, cols, empty))
        head_slots = torch.cat(slot_parts)  # (U,) the LoRA slot of each distinct position
        if self.routing is not None:
            self.routing.use_rows(head_slots)
        counted = head_slots.unique(return_counts=True)
        logit_positions = dict(zip(counted[0].tolist(), counted[1].tolist(), strict=True))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model.get_output_embeddings()(torch.cat(hidden_parts))  # (U, V)
        logits32 = at_least_fp32(logits)  # (U, V), no copy when already fp32
        inverse = torch.cat(inverse_parts).to(self.device)  # (N,) needed prediction -> distinct position
        picked = logits32.reshape(-1).index_select(
            0, inverse * logits32.shape[-1] + select.tokens.to(self.device)
        )  # (N,)
        logp_needed = picked - torch.logsumexp(logits32, dim=-1).index_select(0, inverse)  # (N,)
        logp = torch.zeros(need.shape, device=self.device, dtype=logp_needed.dtype).index_put((rows, cols), logp_needed)
        return PolicyForward(logp, positions, logit_positions, logits, (rows, cols, inverse))

    def backward(self) -> None:
        """Send the gradient the micro-batches left in the shared waves' leaf copies through the shared
        waves, into the LoRA weights' ``.grad``; then drop the shared waves. An output that does not
        depend on the adapter (a first layer's keys when its k_proj has no LoRA) has nowhere to send
        its gradient: it is skipped."""
        outputs, grads = [], []
        for computed, shared in zip(self._computed, self._shared, strict=True):
            for out, leaf in zip(computed.tensors(), shared.tensors(), strict=True):
                if leaf.grad is not None and out.requires_grad:
                    outputs.append(out)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        self._computed, self._shared = [], []


class PrefixRunner:
    """The shared path over one call's micro-batches (consecutive ``chunk_sizes`` rows of ``rows``).

    The whole call's shared prefixes run once (one ``SharedPrefixStep``) when their positions fit in
    ``budget``; otherwise each micro-batch is its own step (prefixes shared inside it only), so a
    call of many long, distinct prompts never holds more prefix activations than ``budget``. Per
    micro-batch ``i``: ``forward(i, need)``, the caller's backward, then ``done(i)``.
    ``positions``: slot -> positions the shared waves ran, so far.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[Sequence[int]],
        slots: Sequence[int],
        chunk_sizes: Sequence[int],
        *,
        budget: int,
        device: torch.device,
        pad_id: int,
        autocast: bool,
        routing: SlotRouting | None,
        min_tokens: int,
        grad: bool,
    ) -> None:
        self.model, self.rows, self.slots, self.grad = model, rows, list(slots), grad
        self.device, self.pad_id, self.autocast, self.routing = device, pad_id, autocast, routing
        self.min_tokens = min_tokens
        self.chunks: list[range] = []
        for size in chunk_sizes:
            start = self.chunks[-1].stop if self.chunks else 0
            self.chunks.append(range(start, start + size))
        whole = plan_prefix_tree(rows, slots, min_tokens=min_tokens)
        self.per_call = whole.shared_positions() <= budget
        self._whole = whole if self.per_call else None
        self._step: SharedPrefixStep | None = None
        self._span: range = range(0)
        self.positions: dict[int, int] = {}

    def forward(self, index: int, need: torch.Tensor) -> PolicyForward:
        """Log-probs of micro-batch ``index`` where ``need`` (b, T) bool on the cpu is True."""
        chunk = self.chunks[index]
        if self._step is None:
            self._span = range(0, len(self.rows)) if self.per_call else chunk
            span = self._span
            self._step = SharedPrefixStep(
                self.model, [self.rows[r] for r in span], self.slots[span.start : span.stop],
                device=self.device, pad_id=self.pad_id, autocast=self.autocast, routing=self.routing,
                min_tokens=self.min_tokens, grad=self.grad, plan=self._whole,
            )
        return self._step.forward([r - self._span.start for r in chunk], need)

    def done(self, index: int) -> None:
        """Micro-batch ``index``'s backward is done: at the end of a span, backward through its prefixes."""
        if self._step is not None and self.chunks[index].stop == self._span.stop:
            if self.grad:
                self._step.backward()
            for slot, n in self._step.positions.items():
                self.positions[slot] = self.positions.get(slot, 0) + n
            self._step = None
