"""The peer loop: single-tenant LoRA RL from the ecosystem's standard pieces, for comparison.

One experiment at a time, the way a single-tenant stack runs it: load the base model with HF
transformers, wrap it with peft ``get_peft_model``, sample with transformers ``generate``
(batched across the episodes that wait for a turn), train with torch ``AdamW``. The task,
rollouts, rewards, advantages and loss are clora's own (clora.envs, clora.rl.chat, clora.rl.rollout,
clora.rl), so the work per step is the same as a clora tenant's; only the runtime differs.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clora.rl.chat import ChatRenderer
from clora.config import ExperimentConfig, ModelConfig
from clora.envs import make_env
from clora.trainer.schedule import scheduled_lr
from clora.messages import Completion, Datum, SamplingSpec
from clora.rl import (
    collate,
    kl_k1_mean,
    loss_denominator,
    loss_numerator,
    micro_batches,
    token_logprobs,
    token_loss,
)
from clora.rl.accuracy import HeldOutScore
from clora.rl.step import episode_settings, evaluate, sample_groups, to_training_data
from clora.tenant.actor import ExperimentResult, StepRecord

__all__ = ["HFBatchSampler", "PeerLoop", "run_peer_experiment"]

MICRO_BATCH = 8


@dataclass
class _GenerateRequest:
    prompt: list[int]
    spec: SamplingSpec
    future: asyncio.Future = field(repr=False)


class HFBatchSampler:
    """A ``SampleFn`` over ``model.generate``: requests that arrive together decode in one batch.

    The first caller becomes the leader and generates every pending request (grouped by sampling
    settings) until none is left; the others wait for their result. Generation runs in a thread.
    """

    def __init__(self, model: Any, tokenizer: Any, renderer: ChatRenderer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = renderer.im_end_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.version = 0
        self._pending: list[_GenerateRequest] = []
        self._leading = False

    async def __call__(self, prompt: list[int], spec: SamplingSpec) -> tuple[Completion, int]:
        item = _GenerateRequest(list(prompt), spec, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        if not self._leading:
            self._leading = True
            try:
                for _ in range(3):  # let the sibling episodes of this step enqueue their turns
                    await asyncio.sleep(0)
                while self._pending:
                    batch, self._pending = self._pending, []
                    await self._generate_all(batch)
            finally:
                self._leading = False
        return await item.future, self.version

    async def _generate_all(self, batch: list[_GenerateRequest]) -> None:
        groups: dict[tuple, list[_GenerateRequest]] = {}
        for item in batch:
            groups.setdefault((item.spec.temperature, item.spec.max_tokens, item.spec.stop), []).append(item)
        for (temperature, max_tokens, stop), items in groups.items():
            try:
                completions = await asyncio.to_thread(
                    self._generate, [i.prompt for i in items], temperature, max_tokens, stop)
            except BaseException as e:
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(e)
                raise
            for i, completion in zip(items, completions):
                i.future.set_result(completion)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], temperature: float, max_tokens: int,
                  stop: tuple[str, ...]) -> list[Completion]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.int64)  # (B, L) left-padded
        attention = torch.zeros_like(ids)  # (B, L)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        self.model.eval()
        out = self.model.generate(
            input_ids=ids, attention_mask=attention, max_new_tokens=max_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, stop_strings=list(stop) or None,
            tokenizer=self.tokenizer, output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, width:]  # (B, T) generated tokens
        logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, T)
        return [self._trim(new[row].tolist(), logprobs[row].tolist(), stop) for row in range(len(prompts))]

    def _trim(self, tokens: list[int], logprobs: list[float], stop: tuple[str, ...]) -> Completion:
        """Cut at <|im_end|> (kept) or after the first stop string (text without it), as vLLM returns them."""
        for k, token in enumerate(tokens):
            if token == self.eos_id:
                return Completion(token_ids=tokens[: k + 1], logprobs=logprobs[: k + 1],
                                  text=self.tokenizer.decode(tokens[:k], skip_special_tokens=True),
                                  finish_reason="stop")
            if stop:
                text = self.tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
                hit = min((text.find(s) for s in stop if s in text), default=-1)
                if hit >= 0:
                    return Completion(token_ids=tokens[: k + 1], logprobs=logprobs[: k + 1], text=text[:hit],
                                      finish_reason="stop")
        return Completion(token_ids=tokens, logprobs=logprobs,
                          text=self.tokenizer.decode(tokens, skip_special_tokens=True), finish_reason="length")


class PeerLoop:
    """One tenant's model, optimizer and sampler, built from transformers + peft + torch."""

    def __init__(self, experiment: ExperimentConfig, model_dir: str, max_model_len: int) -> None:
        import peft
        from transformers import AutoModelForCausalLM, AutoTokenizer

        exp = experiment
        torch.manual_seed(exp.seed)
        self.experiment = exp
        self.max_model_len = max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.renderer = ChatRenderer(self.tokenizer)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        self.model = peft.get_peft_model(base, peft.LoraConfig(
            r=exp.lora.rank, lora_alpha=exp.lora.alpha, target_modules=list(exp.lora.target_modules),
            lora_dropout=0.0))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=exp.optim.lr, betas=(exp.optim.beta1, exp.optim.beta2),
                                           eps=exp.optim.eps, weight_decay=exp.optim.weight_decay)
        self.params = params
        self.optim_steps = 0
        self.sampler = HFBatchSampler(self.model, self.tokenizer, self.renderer)
        self.env = make_env(exp.env)
        self.rng = random.Random(exp.seed)
        self.tokens_sampled = 0

    async def _sample(self, prompt: list[int], spec: SamplingSpec) -> tuple[Completion, int]:
        completion, version = await self.sampler(prompt, spec)
        self.tokens_sampled += len(completion.token_ids)
        return completion, version

    async def evaluate(self, step: int) -> HeldOutScore:
        """Held-out score: greedy, one episode per problem (as a clora tenant measures it)."""
        settings = episode_settings(self.experiment, self.max_model_len, step=step, evaluation=True)
        return await evaluate(self._sample, self.renderer, self.env, self.env.held_out(), settings)

    def train(self, data: list[Datum]) -> None:
        """One optimizer step on ``data``: clora's loss, micro-batched gradient accumulation, clipping, AdamW."""
        exp, loss_cfg = self.experiment, self.experiment.resolved_loss
        self.model.train()
        chunks = [collate(chunk, pad_id=self.sampler.pad_id) for chunk in micro_batches(data, MICRO_BATCH)]
        total = sum(loss_denominator(b.loss_mask, loss_cfg.normalize, loss_cfg.normalize_constant) for b in chunks)
        base_rows: list[torch.Tensor | None] = [None] * len(chunks)
        k1_sum = k1_weight = 0.0
        if loss_cfg.kl_coef > 0:  # the base model: peft's adapter switched off
            with torch.no_grad(), self.model.disable_adapter():
                for i, batch in enumerate(chunks):
                    logits = self.model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
                    base_rows[i] = token_logprobs(logits, batch.tokens)  # (B, T)
                    part_sum, part_weight = kl_k1_mean(batch.sampler_logprobs, base_rows[i], batch.loss_mask)
                    k1_sum, k1_weight = k1_sum + part_sum, k1_weight + part_weight
        k1_baseline = k1_sum / k1_weight if k1_weight > 0 else 0.0
        for batch, base_logp in zip(chunks, base_rows, strict=True):
            logits = self.model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits  # (B, T, V)
            logp = token_logprobs(logits, batch.tokens)  # (B, T)
            loss = token_loss(loss_cfg, logp, batch.sampler_logprobs, batch.advantages, batch.loss_mask,
                              base_logp, k1_baseline)
            (loss_numerator(loss.per_token, batch.loss_mask, loss_cfg.normalize) / max(total, 1e-12)).backward()
        if exp.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, exp.optim.grad_clip)
        for group in self.optimizer.param_groups:  # the tenant's schedule, as clora's trainer applies it
            group["lr"] = scheduled_lr(exp.resolved_optim, self.optim_steps)
        self.optimizer.step()
        self.optim_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.version += 1

    async def step(self, step: int) -> StepRecord:
        exp = self.experiment
        t0 = time.perf_counter()
        problems = self.env.train_problems(self.rng, exp.prompts_per_step)
        groups = await sample_groups(
            self._sample, self.renderer, self.env, problems, exp.group_size,
            episode_settings(exp, self.max_model_len, step=step),
        )  # (P, G)
        batch = to_training_data(problems, groups, exp.advantage)
        data = batch.data
        t1 = time.perf_counter()
        if data:
            await asyncio.to_thread(self.train, data)
        t2 = time.perf_counter()
        return StepRecord(step=step, adapter_version=self.sampler.version, reward_mean=batch.reward_mean,
                          time_rollout_s=t1 - t0, time_train_s=t2 - t1, time_sync_s=0.0, trained=bool(data))


async def run_peer_experiment(
    experiment: ExperimentConfig,
    model: ModelConfig,
    *,
    on_step: Callable[[str, StepRecord], None] | None = None,
) -> ExperimentResult:
    """Load the model, evaluate, train ``experiment.steps`` steps, evaluate; the clock includes the load."""
    from clora.models import resolve_model

    started = time.time()
    model_dir = await asyncio.to_thread(resolve_model, model)
    loop = await asyncio.to_thread(PeerLoop, experiment, str(model_dir), model.max_model_len)
    score_start = await loop.evaluate(0)
    records = []
    for step in range(1, experiment.steps + 1):
        record = await loop.step(step)
        records.append(record)
        if on_step is not None:
            on_step(experiment.name, record)
    score_end = await loop.evaluate(experiment.steps)
    return ExperimentResult(tenant=experiment.name, steps=records, accuracy_start=score_start.accuracy,
                            accuracy_end=score_end.accuracy, started_at=started, finished_at=time.time(),
                            tokens_sampled=loop.tokens_sampled, held_out=score_end.total)
