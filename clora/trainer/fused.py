"""Fused multi-tenant training: several tenants' TrainSteps in one forward/backward pass.

``fused_train_step(core, requests)`` swaps every requesting tenant's store in, binds tenant i
into LoRA slot i of every layer it targets, and runs the tenants' data as one stream of rows
(a tenant's rows next to each other; each tenant's micro-batches as in its own step, packed
together into micro-batches of at most ``core.micro_batch_size`` rows). Each micro-batch's row ``i`` is routed to its tenant's slot, so it sees only its
own adapter (any rank, any alpha, any targets). The loss is the sum over tenants of
``numerator_t / denominator_t`` with each tenant's own LossConfig and its own denominator over
its whole data, exactly as in a single-tenant step; tenant t's weights only touch tenant t's
rows, so one backward yields each tenant's own gradient. Then every tenant gets its own
clipping and AdamW step with its own OptimConfig, and only then its own store write-back.

With shared prefixes on (clora.trainer.prefix_call) the prefix plan covers all members' rows,
each row's slot part of its key: a prefix is shared only by rows of one tenant, computed once under
that tenant's adapter, and its gradient reaches only that tenant's weights.

Failures are per tenant: a malformed request, a non-finite loss or gradient or update of one
tenant leaves that tenant's store bit-identical (its loss terms are dropped from the backward
from then on) and every other tenant is trained exactly as in a separate step. Any other
exception (a bug, out of memory) fails the whole group before any store is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from clora.config import LossConfig
from clora.errors import ConfigError, NonFiniteError
from clora.trainer.base_logprobs import BaseLogprobs, base_logprobs
from clora.trainer.prefix_call import CallForward
from clora.trainer.step_parts import PhaseTimer, apply_optimizer, bound_slots, check_normalize, merge_grads
from clora.trainer.store import AdapterStore, WorkingCopy, swap_in, write_back
from clora.messages import Datum
from clora.rl import (
    check_datum,
    collate,
    loss_denominator,
    loss_metrics,
    loss_numerator,
    micro_batches,
    token_loss,
)

if TYPE_CHECKING:
    from clora.trainer.core import TrainerCore

__all__ = ["FusedRequest", "fused_train_step"]


@dataclass(frozen=True)
class FusedRequest:
    """One tenant's TrainStep inside a fused group."""

    tenant: str
    data: Sequence[Datum]
    loss: LossConfig


@dataclass(eq=False)
class _Member:
    """A tenant taking part in the fused forward/backward."""

    position: int  # index in the caller's request list
    slot: int  # LoRA slot (index among members)
    request: FusedRequest
    store: AdapterStore
    work: WorkingCopy
    denominator: float  # the whole request's normalisation denominator
    sums: dict[str, float] = field(
        default_factory=lambda: {
            "loss": 0.0, "kl": 0.0, "kl_sampler": 0.0, "entropy": 0.0, "clip_frac": 0.0, "ratio": 0.0,
        }
    )
    tokens: float = 0.0
    computed: float = 0.0  # token positions of its rows run through the trunk (padding included)
    lm_head: float = 0.0  # positions of its rows run through the LM head
    base: BaseLogprobs | None = None  # the base model's log-probs of its data, when its loss has a KL penalty
    values: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None

    def metrics(self) -> dict[str, float]:
        return loss_metrics(self.sums, self.tokens, len(self.request.data), self.request.loss) | {
            "tokens_computed": self.computed, "tokens_lm_head": self.lm_head,
        }


def fused_train_step(core: TrainerCore, requests: Sequence[FusedRequest]) -> list[dict[str, float] | Exception]:
    """One TrainStep per request, fused into one forward/backward; per-request outcome, in order.

    An outcome is the step's values (as ``TrainerCore.train_step``, plus ``fused`` = tenants in
    the fused pass; ``time/*`` are the whole group's) or the exception that rejected that
    request (its store unchanged). Two requests for one tenant cannot share a group: the later
    one is a ConfigError.
    """
    outcomes: list[dict[str, float] | Exception | None] = [None] * len(requests)
    timer = PhaseTimer()
    with timer("time/swap_in"):
        members = _admit(core, requests, outcomes)
    if members:
        with timer("time/fwd_bwd"):
            penalised = [m for m in members if m.request.loss.kl_coef > 0]
            if penalised:
                with timer("time/base_fwd"):
                    for m in penalised:  # on the member's own micro-batches, as its separate step cuts them
                        m.base = base_logprobs(core, m.request.data)
            _forward_backward(core, members)
            for m in _alive(members):
                try:
                    merge_grads(m.store, m.work, m.denominator, m.request.loss.normalize)
                except NonFiniteError as exc:
                    m.error = exc
        with timer("time/optim"):
            for m in _alive(members):
                try:
                    m.values = apply_optimizer(m.store, m.work)
                except NonFiniteError as exc:
                    m.error = exc
        with timer("time/swap_out"):
            for m in _alive(members):
                write_back(m.store, m.work, params=True, optim_state=True, grads=True)
    for m in members:
        if m.error is not None:
            outcomes[m.position] = m.error
        else:
            outcomes[m.position] = {
                **m.metrics(), **m.values, **timer.values,
                "version": float(m.store.version), "fused": float(len(members)),
            }
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def _alive(members: list[_Member]) -> list[_Member]:
    return [m for m in members if m.error is None]


def _admit(
    core: TrainerCore, requests: Sequence[FusedRequest], outcomes: list[dict[str, float] | Exception | None]
) -> list[_Member]:
    """Check each request and swap its tenant in; a bad request becomes its outcome (ConfigError,
    UnknownTenantError) and stays out of the pass."""
    members: list[_Member] = []
    seen: set[str] = set()
    for position, request in enumerate(requests):
        try:
            if request.tenant in seen:
                raise ConfigError(f"tenant {request.tenant!r}: two TrainSteps of one tenant cannot be fused")
            store = core.store(request.tenant)
            check_normalize(store, request.loss)
            if not request.data:
                raise ConfigError(f"tenant {store.tenant!r}: a training call needs at least one datum")
            for index, datum in enumerate(request.data):
                check_datum(index, datum)
            core.check_data(request.tenant, request.data)
            denominator = sum(
                loss_denominator(
                    collate(chunk, core.pad_token_id).loss_mask, request.loss.normalize,
                    request.loss.normalize_constant,
                )
                for chunk in micro_batches(request.data, core.micro_batch_size)
            )  # summed per micro-batch, as the single-tenant path does
        except Exception as exc:  # noqa: BLE001 - the request's own error, reported to its asker
            outcomes[position] = exc
            continue
        seen.add(request.tenant)
        work = swap_in(store, core.device, trainable=True, optim_state=True, grads=True)
        members.append(_Member(position, len(members), request, store, work, denominator))
    return members


def _forward_backward(core: TrainerCore, members: list[_Member]) -> None:
    """Forward/backward over the members' rows; each tenant's gradient lands in its own ``.grad``."""
    packed = _packed_micro_batches(members, core.micro_batch_size)
    rows = [(datum, m) for chunk in packed for datum, m, _ in chunk]
    with bound_slots(core.model, core.routing, [(m.store, m.work) for m in members]):
        # every forward routed row by row to its tenant's slot; no prefix is shared across slots
        policy = CallForward(
            core, [datum.tokens for datum, _ in rows], [len(c) for c in packed], grad=True,
            slots=[m.slot for _, m in rows],
        )
        for index, chunk in enumerate(packed):
            cpu = collate([datum for datum, _, _ in chunk], core.pad_token_id)
            batch = cpu.to(core.device)
            owners = [m for _, m, _ in chunk]
            forward = policy.forward(index, cpu, batch, cpu.loss_mask != 0)
            logp = forward.logp  # (B, T), 0.0 where no log-prob was needed (shared path)
            with torch.no_grad():
                entropy = forward.entropy()  # (B, T)
            terms: list[torch.Tensor] = []
            for m, start, stop in _owner_runs(owners):
                if m.error is not None:
                    continue  # rejected earlier: its rows still pass the base model, its loss is dropped
                rows_of = slice(start, stop)
                mask = batch.loss_mask[rows_of]  # (R, T)
                base_logp = None
                if m.base is not None:
                    base_logp = m.base.batch([i for _, _, i in chunk[rows_of]], batch.tokens.shape[1])  # (R, T)
                parts = token_loss(
                    m.request.loss, logp[rows_of], batch.sampler_logprobs[rows_of], batch.advantages[rows_of], mask,
                    base_logp, 0.0 if m.base is None else m.base.k1_mean,
                )
                numerator = loss_numerator(parts.per_token, mask, m.request.loss.normalize)  # ()
                if not torch.isfinite(numerator):
                    m.error = NonFiniteError(
                        f"tenant {m.store.tenant!r}: non-finite loss in fused micro-batch {index}; "
                        f"step rejected, adapter stays at version {m.store.version}"
                    )
                    continue
                if m.denominator > 0 and numerator.requires_grad:  # no loss position here: no gradient to send
                    terms.append(numerator / m.denominator)
                with torch.no_grad():
                    m.sums["loss"] += float(numerator) / m.denominator if m.denominator > 0 else 0.0
                    m.sums["kl"] += float((parts.kl * mask).sum())
                    m.sums["kl_sampler"] += float((parts.kl_sampler * mask).sum())
                    m.sums["entropy"] += float((entropy[rows_of] * mask).sum())
                    m.sums["clip_frac"] += float((parts.clipped.float() * mask).sum())
                    m.sums["ratio"] += float((parts.ratio * mask).sum())
                    m.tokens += float(mask.sum())
            if terms:
                torch.stack(terms).sum().backward()  # d(sum)/d(term_t) = 1: tenant t gets its own gradient
            policy.done(index)  # after the last micro-batch: backward through the shared prefixes
            del forward, logp, entropy
    for m in members:
        m.computed = float(policy.positions.get(m.slot, 0))
        m.lm_head = float(policy.logit_positions.get(m.slot, 0))


def _packed_micro_batches(members: list[_Member], size: int) -> list[list[tuple[Datum, _Member, int]]]:
    """Each tenant's data cut into micro-batches exactly as its single-tenant step cuts it, and
    consecutive chunks packed, in order, into fused micro-batches of at most ``size`` rows.

    A tenant's gradient is then summed over the same chunks in the same order as in a separate
    step, so fusing does not even change float rounding (re-chunking would: Adam's first step
    amplifies that rounding to ~1e-6 on near-zero gradients). A tenant's rows stay contiguous.
    Each row is (datum, its member, the datum's index in the member's data).
    """
    packed: list[list[tuple[Datum, _Member, int]]] = []
    current: list[tuple[Datum, _Member, int]] = []
    for m in members:
        first = 0
        for chunk in micro_batches(m.request.data, size):
            if current and len(current) + len(chunk) > size:
                packed.append(current)
                current = []
            current.extend((datum, m, first + i) for i, datum in enumerate(chunk))
            first += len(chunk)
    if current:
        packed.append(current)
    return packed


def _owner_runs(owners: list[_Member]) -> list[tuple[_Member, int, int]]:
    """(member, start, stop) for each run of consecutive rows of one member."""
    runs: list[tuple[_Member, int, int]] = []
    for i, m in enumerate(owners):
        if runs and runs[-1][0] is m:
            runs[-1] = (m, runs[-1][1], i + 1)
        else:
            runs.append((m, i, i + 1))
    return runs
