"""A stand-in for SamplerActor (no vLLM) that the real Runtime can start: monkeypatch
``clora.runtime.SamplerActor`` with ``RecordingSampler``.

Completions are drawn from the tokenizer-free range 100..149 by a ``random.Random`` seeded with the
request's ``sampling.seed`` (a fresh unseeded one when it has none), so a seeded request always gets the
same completion, like vLLM's per-request seeds. Every request is recorded in ``requests`` and logged
as ``sampler.sample_done``.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import ClassVar

from actors import Actor, handler
from clora import events
from clora.errors import UnknownTenantError
from clora.messages import (
    AdapterLoaded,
    Completion,
    LoadAdapter,
    RegisterAdapter,
    RemoveAdapter,
    SampleRequest,
    SampleResult,
)


class RecordingSampler(Actor):
    mailbox_size = 256
    instances: ClassVar[list[RecordingSampler]] = []

    def __init__(self, model_dir: Path, model_cfg, engine_cfg) -> None:
        self.model_dir = Path(model_dir)
        self.requests: list[SampleRequest] = []
        self.serving: dict[str, int] = {}
        RecordingSampler.instances.append(self)

    @handler(concurrent=True)
    async def sample(self, msg: SampleRequest) -> SampleResult:
        if msg.tenant is not None and msg.tenant not in self.serving:
            raise UnknownTenantError(f"tenant {msg.tenant!r} has no adapter in the sampler")
        self.requests.append(msg)
        started = time.perf_counter()
        await asyncio.sleep(0.005)  # some time for the timeline
        rng = random.Random(msg.sampling.seed) if msg.sampling.seed is not None else random.Random()
        completions = []
        for _ in range(msg.sampling.n):
            n = rng.randint(1, msg.sampling.max_tokens)
            tokens = [rng.randrange(100, 150) for _ in range(n)]
            completions.append(Completion(token_ids=tokens, logprobs=[-1.0] * n, text=" ".join(map(str, tokens)),
                                          finish_reason="length"))
        version = self.serving[msg.tenant] if msg.tenant is not None else -1
        self.log.info(events.SAMPLE_DONE, tenant=msg.tenant, adapter_version=version, n=msg.sampling.n,
                      prompt_tokens=len(msg.prompt_token_ids),
                      completion_tokens=sum(len(c.token_ids) for c in completions),
                      duration_s=round(time.perf_counter() - started, 4))
        return SampleResult(tenant=msg.tenant, adapter_version=version, prompt_token_ids=list(msg.prompt_token_ids),
                            completions=completions)

    @handler
    async def register(self, msg: RegisterAdapter) -> AdapterLoaded:
        self.serving[msg.tenant] = msg.version
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=0.0)

    @handler
    async def load(self, msg: LoadAdapter) -> AdapterLoaded:
        self.serving[msg.tenant] = msg.version
        return AdapterLoaded(tenant=msg.tenant, version=msg.version, duration_s=0.0)

    @handler
    async def remove(self, msg: RemoveAdapter) -> None:
        self.serving.pop(msg.tenant, None)
