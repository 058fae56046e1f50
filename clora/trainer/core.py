"""Synchronous multi-tenant LoRA training on one frozen base model.

``TrainerCore`` owns the model and every tenant's ``AdapterStore``. Each call swaps one
tenant's state onto the device, binds it into LoRA slot 0 of every target layer, does its
work, and writes results back into the store only after everything succeeded (see
clora.trainer.store). It is not thread-safe: one call at a time (TrainerActor serialises calls
under its device lock and runs them in a worker thread).

Gradient accumulation: a ForwardBackward adds its normalised gradient into the store as a
running mean weighted by the normalisation denominator (trained tokens, or sequences), and
OptimStep applies that mean. So ForwardBackward(d1) + ForwardBackward(d2) + OptimStep equals
TrainStep(d1 + d2) for both normalisations, up to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.errors import ConfigError, DuplicateTenantError, NonFiniteError, PromptTooLongError, UnknownTenantError
from clora.precision import trainer_autocast_bf16
from clora.trainer.attach import attach_lora, check_lora_fits, layer_shapes
from clora.trainer.base_logprobs import BaseLogprobs, base_logprobs
from clora.trainer.fused import FusedRequest, fused_train_step
from clora.trainer.lora_layer import SlotRouting
from clora.trainer.prefix import prefix_unsupported
from clora.trainer.prefix_call import PREFIX_MIN_TOKENS, CallForward
from clora.trainer.peft_io import export_peft, import_peft, peft_config_dict, peft_state_dict
from clora.trainer.schedule import check_schedule
from clora.trainer.step_parts import PhaseTimer, apply_optimizer, bound_slots, check_normalize, merge_grads
from clora.trainer.store import AdapterStore, WorkingCopy, swap_in, write_back
from clora.messages import AdapterSnapshot, Datum
from clora.rl import (
    collate,
    loss_denominator,
    loss_metrics,
    loss_numerator,
    micro_batches,
    token_loss,
)

__all__ = ["TrainerCore", "resolve_device"]

_SLOT = 0  # the single-tenant path binds its tenant here; fused steps use slots 0..K-1


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"trainer.device: {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {name!r} but torch sees no CUDA device here; use 'auto' or 'cpu'")
    return device


class TrainerCore:
    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        autocast_bf16: bool = False,
        micro_batch_size: int = 8,
        base_model_name: str | None = None,
        pad_token_id: int = 0,
        max_seq_len: int | None = None,
        shared_prefix: bool = True,
    ) -> None:
        """``max_seq_len``: the longest datum accepted; default the model's max_position_embeddings.
        ``shared_prefix``: compute token prefixes shared by a call's rows once and the LM head only
        where a log-prob is needed (clora.trainer.prefix_call); False: the naive reference path. Models
        the shared path cannot run exactly (``prefix_unsupported``) use the naive path either way."""
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.requires_grad_(False)
        self.model.eval()  # no dropout: train and eval forward are the same function
        self.autocast_bf16 = autocast_bf16
        self.micro_batch_size = micro_batch_size
        self.base_model_name = base_model_name
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size: int | None = getattr(embeddings, "num_embeddings", None)
        self.routing = SlotRouting()
        self.stores: dict[str, AdapterStore] = {}
        self.pin_memory = torch.cuda.is_available()
        off = "TrainerConfig.shared_prefix is off" if not shared_prefix else prefix_unsupported(model)
        self.prefix_off_reason: str | None = off
        self.shared_prefix = off is None
        self.prefix_min_tokens = PREFIX_MIN_TOKENS

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: TrainerConfig) -> TrainerCore:
        """Load a HF causal LM directory in fp32 (bf16 compute comes from autocast, if enabled)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
        hf_config = AutoConfig.from_pretrained(str(model_dir))
        pad = hf_config.pad_token_id if isinstance(hf_config.pad_token_id, int) else 0
        device = resolve_device(config.device)
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return cls(
            model,
            device=device,
            autocast_bf16=trainer_autocast_bf16(config.autocast_bf16, device.type, cuda_bf16),
            micro_batch_size=config.micro_batch_size,
            base_model_name=str(model_dir),
            pad_token_id=pad,
            shared_prefix=config.shared_prefix,
        )

    # ------------------------------------------------------------------ tenants

    def add_tenant(
        self, tenant: str, lora: LoraConfig, optim: OptimConfig, init_from: str | Path | None = None
    ) -> AdapterStore:
        """Create a version-0 store (seeded init, or the PEFT adapter at ``init_from``)."""
        if tenant in self.stores:
            raise DuplicateTenantError(f"tenant {tenant!r} already exists in the trainer")
        check_schedule(optim, f"tenant {tenant!r}")
        targets = check_lora_fits(self.model, lora)
        shapes = layer_shapes(targets)
        initial = None if init_from is None else import_peft(init_from, lora, shapes, self.base_model_name)
        store = AdapterStore.create(tenant, lora, optim, shapes, pin_memory=self.pin_memory, initial=initial)
        attach_lora(self.model, lora.target_modules, self.routing)
        self.stores[tenant] = store
        return store

    def remove_tenant(self, tenant: str) -> None:
        self.store(tenant)
        del self.stores[tenant]

    def store(self, tenant: str) -> AdapterStore:
        try:
            return self.stores[tenant]
        except KeyError:
            raise UnknownTenantError(f"tenant {tenant!r} is not registered in the trainer") from None

    # ------------------------------------------------------------------ training

    def check_data(self, tenant: str, data: Sequence[Datum]) -> None:
        """Refuse data the model cannot take, before any work: PromptTooLongError for a datum longer
        than ``max_seq_len``, ConfigError for a token id outside the vocabulary."""
        for index, datum in enumerate(data):
            if self.max_seq_len is not None and len(datum.tokens) > self.max_seq_len:
                raise PromptTooLongError(
                    f"tenant {tenant!r}: datum {index} has {len(datum.tokens)} tokens; the trainer accepts "
                    f"at most {self.max_seq_len} (the base model's max_position_embeddings)"
                )
            if self.vocab_size is not None and datum.tokens:
                low, high = min(datum.tokens), max(datum.tokens)
                if low < 0 or high >= self.vocab_size:
                    bad = low if low < 0 else high
                    raise ConfigError(
                        f"tenant {tenant!r}: datum {index}: token id {bad} at position {datum.tokens.index(bad)} "
                        f"is outside the vocabulary [0, {self.vocab_size})"
                    )

    def forward_backward(self, tenant: str, data: Sequence[Datum], loss: LossConfig) -> dict[str, float]:
        """Accumulate the gradient of ``loss`` over ``data`` into the tenant's store."""
        store = self.store(tenant)
        self.check_data(tenant, data)
        check_normalize(store, loss)
        timer = PhaseTimer()
        with timer("time/swap_in"):
            work = swap_in(store, self.device, trainable=True, grads=True)
        with timer("time/fwd_bwd"):
            metrics = self._accumulate(store, work, data, loss)
        with timer("time/swap_out"):
            write_back(store, work, params=False, optim_state=False, grads=True)
        return {**metrics, **timer.values, "version": float(store.version)}

    def optim_step(self, tenant: str, optim: OptimConfig | None = None) -> dict[str, float]:
        """Apply the accumulated gradient (with ``optim`` instead of the tenant's hyperparameters when
        given); the version goes up by one."""
        store = self.store(tenant)
        if store.grad_normalize is None:
            raise ConfigError(
                f"tenant {tenant!r}: OptimStep without a ForwardBackward since version {store.version}"
            )
        timer = PhaseTimer()
        with timer("time/swap_in"):
            work = swap_in(store, self.device, optim_state=True, grads=True)
        with timer("time/optim"):
            metrics = apply_optimizer(store, work, optim)
        with timer("time/swap_out"):
            write_back(store, work, params=True, optim_state=True, grads=True)
        return {**metrics, **timer.values, "version": float(store.version)}

    def train_step(self, tenant: str, data: Sequence[Datum], loss: LossConfig) -> dict[str, float]:
        """ForwardBackward then OptimStep with one swap; atomic: all or nothing reaches the store."""
        store = self.store(tenant)
        self.check_data(tenant, data)
        check_normalize(store, loss)
        timer = PhaseTimer()
        with timer("time/swap_in"):
            work = swap_in(store, self.device, trainable=True, optim_state=True, grads=True)
        with timer("time/fwd_bwd"):
            metrics = self._accumulate(store, work, data, loss)
        with timer("time/optim"):
            metrics |= apply_optimizer(store, work)
        with timer("time/swap_out"):
            write_back(store, work, params=True, optim_state=True, grads=True)
        return {**metrics, **timer.values, "version": float(store.version), "fused": 1.0}

    def train_steps_fused(self, requests: Sequence[FusedRequest]) -> list[dict[str, float] | Exception]:
        """Several tenants' TrainSteps in one forward/backward (see clora.trainer.fused); one outcome
        per request, in order: its values, or the exception that rejected it (store unchanged)."""
        return fused_train_step(self, requests)

    def compute_logprobs(self, tenant: str, data: Sequence[Datum]) -> list[list[float]]:
        """Trainer-policy log-prob of every token of each datum (index 0 is 0.0)."""
        store = self.store(tenant)
        self.check_data(tenant, data)
        work = swap_in(store, self.device)
        out: list[list[float]] = []
        batches = [collate(chunk, self.pad_token_id) for chunk in micro_batches(data, self.micro_batch_size)]
        with torch.no_grad(), self._bound(store, work):
            policy = CallForward(self, [d.tokens for d in data], [len(b.lengths) for b in batches], grad=False)
            for index, cpu in enumerate(batches):
                need = cpu.attention_mask.bool()  # (B, T): every token's log-prob but token 0's (no prediction)
                need[:, 0] = False
                rows = policy.forward(index, cpu, cpu.to(self.device), need).logp.cpu().tolist()  # (B, T)
                policy.done(index)
                out.extend(row[:n] for row, n in zip(rows, cpu.lengths, strict=True))
        return out

    # ------------------------------------------------------------------ adapters

    def peft_config(self, tenant: str) -> dict[str, Any]:
        return peft_config_dict(self.store(tenant).lora, self.base_model_name)

    def snapshot(self, tenant: str) -> AdapterSnapshot:
        store = self.store(tenant)
        return AdapterSnapshot(
            tenant=tenant, version=store.version, tensors=peft_state_dict(store), peft_config=self.peft_config(tenant)
        )

    def export_adapter(self, tenant: str, out_dir: str | Path) -> AdapterSnapshot:
        """Write the tenant's current adapter as a PEFT directory; returns what was written."""
        snap = self.snapshot(tenant)
        export_peft(snap.tensors, snap.peft_config, out_dir, version=snap.version)
        return snap

    def import_adapter(self, tenant: str, path: str | Path) -> int:
        """Replace the tenant's weights with the PEFT adapter at ``path`` (checked against the
        tenant's LoraConfig and the base model); optimizer state is reset. Returns the new version."""
        store = self.store(tenant)
        tensors = import_peft(path, store.lora, store.shapes, self.base_model_name)
        store.replace_weights(tensors)
        return store.version

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _bound(self, store: AdapterStore, work: WorkingCopy) -> Iterator[None]:
        """Route every row to slot 0 holding ``work``'s weights; unbind afterwards."""
        with bound_slots(self.model, self.routing, [(store, work)]):
            self.routing.use_slot(_SLOT)
            yield

    def _accumulate(
        self, store: AdapterStore, work: WorkingCopy, data: Sequence[Datum], loss_cfg: LossConfig
    ) -> dict[str, float]:
        """Forward/backward over micro-batches (clora.trainer.prefix_call); merge the mean gradient
        into ``work.grads``.

        With a KL penalty (``kl_coef > 0``) the base model's log-probs come first, from a no-grad
        forward of the same micro-batches with the adapter routed off (clora.trainer.base_logprobs)."""
        assert work.grads is not None
        if not data:
            raise ConfigError(f"tenant {store.tenant!r}: a training call needs at least one datum")
        batches = [collate(chunk, self.pad_token_id) for chunk in micro_batches(data, self.micro_batch_size)]
        denominator = sum(
            loss_denominator(b.loss_mask, loss_cfg.normalize, loss_cfg.normalize_constant) for b in batches
        )
        extra: dict[str, float] = {}
        base: BaseLogprobs | None = None
        if loss_cfg.kl_coef > 0:
            start = time.perf_counter()
            base = base_logprobs(self, data)
            extra["time/base_fwd"] = time.perf_counter() - start
        sums = {"loss": 0.0, "kl": 0.0, "kl_sampler": 0.0, "entropy": 0.0, "clip_frac": 0.0, "ratio": 0.0}
        tokens = 0.0
        first = 0  # index of the micro-batch's first datum
        with self._bound(store, work):
            policy = CallForward(self, [d.tokens for d in data], [len(b.lengths) for b in batches], grad=True)
            for index, cpu_batch in enumerate(batches):
                batch = cpu_batch.to(self.device)
                rows = range(first, first + len(batch.lengths))
                first = rows.stop
                mask = batch.loss_mask  # (B, T)
                forward = policy.forward(index, cpu_batch, batch, cpu_batch.loss_mask != 0)
                logp = forward.logp  # (B, T), 0.0 where no log-prob was needed (shared path)
                base_logp = None if base is None else base.batch(rows, batch.tokens.shape[1])  # (B, T)
                parts = token_loss(
                    loss_cfg, logp, batch.sampler_logprobs, batch.advantages, mask,
                    base_logp, 0.0 if base is None else base.k1_mean,
                )
                numerator = loss_numerator(parts.per_token, mask, loss_cfg.normalize)  # ()
                if not torch.isfinite(numerator):
                    raise NonFiniteError(
                        f"tenant {store.tenant!r}: non-finite loss in micro-batch {index}; "
                        f"step rejected, adapter stays at version {store.version}"
                    )
                if denominator > 0 and numerator.requires_grad:  # no loss position here: no gradient to send
                    (numerator / denominator).backward()
                policy.done(index)  # after the call's last micro-batch: backward through the shared prefixes
                with torch.no_grad():
                    entropy = forward.entropy()  # (B, T)
                    sums["loss"] += float(numerator) / denominator if denominator > 0 else 0.0
                    sums["kl"] += float((parts.kl * mask).sum())
                    sums["kl_sampler"] += float((parts.kl_sampler * mask).sum())
                    sums["entropy"] += float((entropy * mask).sum())
                    sums["clip_frac"] += float((parts.clipped.float() * mask).sum())
                    sums["ratio"] += float((parts.ratio * mask).sum())
                    tokens += float(mask.sum())
                del forward, logp, parts
        merge_grads(store, work, denominator, loss_cfg.normalize)
        extra["tokens_computed"] = float(sum(policy.positions.values()))
        extra["tokens_lm_head"] = float(sum(policy.logit_positions.values()))
        return loss_metrics(sums, tokens, len(data), loss_cfg) | extra


