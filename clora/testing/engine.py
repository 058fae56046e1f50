"""FakeEngine: the engine interface the SamplerActor drives, answering from a script instead of vLLM.

Use it where the engine is (``SamplerActor(..., shared_engine=engine)``, ``Runtime(config,
engine=engine)``) or where a rollout's sample function is (``engine.sample_fn()`` for
``clora.rl.rollout.run_episode`` / ``run_group``). Every answer comes from the script:

- a sequence of replies, handed out in the order the requests arrive (the last one repeats), or
- a function ``script(request: FakeRequest) -> reply`` (sync or async; an async one can wait on
  events the test controls, which makes a request "decode" until the test releases it).

A reply is a ``Completion`` (used as it is) or a text: the tokenizer encodes it (``eos_token_id``
appended when given, the tokens cut at ``max_tokens``, finish reason "length" when cut, else
"stop"); the text stays as scripted. Its log-probs are a fixed function of token and position.

The engine records what happened: ``requests`` (one ``FakeRequest`` per completion), ``completions``,
``adapters`` (every adapter it loaded, with its tensors when ``read_adapters``), ``serving``
(LoRA id -> the adapter it holds now), ``removed`` (LoRA ids unloaded, in order) and ``mixed``: the
requests whose tokens did not all come from the version they named (their LoRA id held another
version when they started, or was reloaded or unloaded while they decoded). A correct sampler keeps
``mixed`` empty. ``refuse_load`` and ``kill`` inject the failures a real engine
has: an adapter it refuses, and death.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from clora.checkpoint.peft_dir import read_peft_dir
from clora.config import EngineConfig, ModelConfig
from clora.errors import AdapterMismatchError, EngineDeadError
from clora.messages import Completion, SamplingSpec
from clora.sampler.adapter_names import parse_adapter_name
from clora.sampler.adapter_files import check_adapter
from clora.sampler.engine import BASE_ADAPTER_ID, GenerationOutput, check_prompt_fits

__all__ = ["FakeEngine", "FakeRequest", "LoadedAdapter", "Reply", "Script"]

Reply = Union[str, Completion]
Script = Union[Sequence[Reply], Callable[["FakeRequest"], Union[Reply, Awaitable[Reply]]]]


@dataclass(frozen=True)
class FakeRequest:
    """One completion asked of the engine (a request for ``n`` samples is ``n`` of these)."""

    index: int  # 0-based position among all the engine's requests
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    tenant: str | None  # None: the base model
    version: int | None  # the tenant's adapter version serving it; None for the base model
    adapter_name: str | None  # the engine-level adapter name; None for the base model
    lora_id: int | None  # the engine's LoRA id serving it; None for the base model (and in sample_fn)
    repeat: int  # identical requests (same tenant, version and prompt) before this one


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter the engine loaded: registered (``add``) or replaced in place (``reload``)."""

    tenant: str
    version: int
    lora_id: int
    name: str
    path: Path
    kind: Literal["add", "reload"]
    tensors: dict[str, Any] | None  # the file's tensors (torch) when the engine reads adapters
    config: dict[str, Any] | None  # its adapter_config.json when the engine reads adapters


class FakeEngine:
    """Stands in for ``clora.sampler.engine.Engine``: no vLLM, no device, answers from ``script``.

    ``tokenizer``: encodes text replies (any object with ``encode(text, add_special_tokens=False)``).
    ``read_adapters``: check each loaded adapter as the real engine does and keep its tensors
    (False for tests whose adapter paths are not files). ``decode_s`` / ``load_s``: how long each
    request / adapter load takes. Prompt and rank limits: ``max_model_len``, ``max_lora_rank``.
    """

    def __init__(
        self,
        script: Script,
        *,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        max_model_len: int = ModelConfig().max_model_len,
        max_lora_rank: int = EngineConfig().max_lora_rank,
        read_adapters: bool = True,
        decode_s: float = 0.0,
        load_s: float = 0.0,
    ) -> None:
        if not callable(script) and not (isinstance(script, Sequence) and len(script) > 0):
            raise TypeError("script: give a non-empty sequence of replies or a function of a FakeRequest")
        self.script = script
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.read_adapters = read_adapters
        self.decode_s = decode_s
        self.load_s = load_s
        self.requests: list[FakeRequest] = []
        self.completions: list[Completion] = []
        self.adapters: list[LoadedAdapter] = []
        self.serving: dict[int, LoadedAdapter] = {}
        self.removed: list[int] = []
        self.mixed: list[FakeRequest] = []
        self.peak_adapters = 0  # the most distinct adapters with requests in the engine at once
        self._in_flight: Counter[int | None] = Counter()  # lora id (None: base) -> requests decoding
        self._asked: Counter[tuple] = Counter()
        self._ids = itertools.count(BASE_ADAPTER_ID + 1)
        self._refusals: dict[tuple[str, int], tuple[int | None, str]] = {}
        self._death: str | None = None

    # ------------------------------------------------------------------ failures to inject

    def refuse_load(self, tenant: str, version: int, *, times: int | None = None, reason: str = "refused") -> None:
        """Loads of ``tenant``'s ``version`` fail like an adapter vLLM refuses (the first ``times`` of
        them; all when None), with ``reason`` in the error."""
        self._refusals[(tenant, version)] = (times, reason)

    def kill(self, reason: str = "killed by the test") -> None:
        """The engine dies: every later call raises ``EngineDeadError`` (the SamplerActor crashes)."""
        self._death = reason

    def loaded(self, tenant: str) -> list[LoadedAdapter]:
        """The adapters ``tenant`` had loaded, in order (its published versions)."""
        return [a for a in self.adapters if a.tenant == tenant]

    # ------------------------------------------------------------------ the Engine interface

    @property
    def is_dead(self) -> bool:
        """After ``kill`` or ``shutdown``."""
        return self._death is not None

    def num_unfinished_requests(self) -> int:
        """Requests decoding now."""
        return sum(self._in_flight.values())

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """PromptTooLongError as from the real engine (empty prompt, or longer than ``max_model_len``)."""
        check_prompt_fits(prompt_token_ids, max_tokens, self.max_model_len)

    def check_adapter(self, path: Path) -> None:
        """AdapterMismatchError as from the real engine (only when ``read_adapters``)."""
        if self.read_adapters:
            check_adapter(Path(path), max_rank=self.max_lora_rank)

    def allocate_adapter_id(self) -> int:
        """A fresh LoRA id (never reused)."""
        return next(self._ids)

    async def add_adapter(self, name: str, lora_id: int, path: Path) -> float:
        """Load adapter ``name`` (made by ``clora.sampler.adapter_names.adapter_name``) as ``lora_id``; seconds taken."""
        return await self._load(name, lora_id, Path(path), "add")

    async def reload_adapter(self, name: str, lora_id: int, path: Path) -> float:
        """Replace what ``lora_id`` serves (an in-place update); seconds taken."""
        return await self._load(name, lora_id, Path(path), "reload")

    async def remove_adapter(self, lora_id: int) -> None:
        """``lora_id`` serves nothing any more."""
        self._check_alive()
        if self.serving.pop(lora_id, None) is not None:
            self.removed.append(lora_id)

    async def loaded_adapter_ids(self) -> set[int]:
        """The LoRA ids serving an adapter now."""
        return set(self.serving)

    def shutdown(self) -> None:
        """Like the real engine: unusable afterwards."""
        if self._death is None:
            self._death = "the engine was shut down"

    async def generate(
        self,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: tuple[str, int, Path] | None,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> GenerationOutput:
        """``spec.n`` scripted completions; ``adapter=(name, lora_id, path)`` or None for the base model."""
        self._check_alive()
        self.check_prompt(prompt_token_ids, spec.max_tokens)
        name, lora_id = (adapter[0], adapter[1]) if adapter is not None else (None, None)
        tenant, version = parse_adapter_name(name) if name is not None else (None, None)
        requests = [self._record(prompt_token_ids, spec, tenant, version, name, lora_id) for _ in range(spec.n)]
        held = self.serving.get(lora_id) if lora_id is not None else None  # the weights it starts on
        if lora_id is not None and (held is None or held.version != version):
            self.mixed.extend(requests)
        self._in_flight[lora_id] += 1
        self.peak_adapters = max(self.peak_adapters, sum(1 for k in self._in_flight if k is not None))
        try:
            completions = [await self._complete(r) for r in requests]
        finally:
            self._in_flight[lora_id] -= 1
            if not self._in_flight[lora_id]:
                del self._in_flight[lora_id]
            if lora_id is not None and held is not None and self.serving.get(lora_id) is not held:
                self.mixed.extend(r for r in requests if r not in self.mixed)  # weights changed mid-decode
        self._check_alive()
        if on_progress is not None:
            on_progress(sum(len(c.token_ids) for c in completions))
        return GenerationOutput(prompt_token_ids=list(prompt_token_ids), completions=completions)

    # ------------------------------------------------------------------ a rollout's sample function

    def sample_fn(
        self, *, tenant: str | None = None, versions: int | Iterable[int] = 0
    ) -> Callable[[list[int], SamplingSpec], Awaitable[tuple[Completion, int]]]:
        """A ``clora.rl.rollout.SampleFn`` answering from this engine's script, without any actor.

        ``versions``: the adapter version each call reports: one int, or an iterable giving one
        per call (as for a tenant whose adapter is replaced between turns).
        """
        version_of_call = itertools.repeat(versions) if isinstance(versions, int) else iter(versions)

        async def sample(prompt_token_ids: list[int], spec: SamplingSpec) -> tuple[Completion, int]:
            if spec.n != 1:
                raise ValueError(f"a rollout samples one completion per call, got n={spec.n}")
            self._check_alive()
            self.check_prompt(prompt_token_ids, spec.max_tokens)
            version = next(version_of_call)
            request = self._record(prompt_token_ids, spec, tenant, version, None, None)
            return await self._complete(request), version

        return sample

    # ------------------------------------------------------------------ internals

    def _check_alive(self) -> None:
        if self._death is not None:
            raise EngineDeadError(f"the vLLM engine process died: {self._death}")

    def _record(self, prompt: list[int], spec: SamplingSpec, tenant: str | None, version: int | None,
                name: str | None, lora_id: int | None) -> FakeRequest:
        key = (tenant, version, tuple(prompt))
        request = FakeRequest(index=len(self.requests), prompt_token_ids=list(prompt), sampling=spec, tenant=tenant,
                              version=version, adapter_name=name, lora_id=lora_id, repeat=self._asked[key])
        self._asked[key] += 1
        self.requests.append(request)
        return request

    async def _complete(self, request: FakeRequest) -> Completion:
        await asyncio.sleep(self.decode_s)  # at least one loop turn, as a real request takes
        if callable(self.script):
            reply = self.script(request)
            if inspect.isawaitable(reply):
                reply = await reply
        else:
            reply = self.script[min(request.index, len(self.script) - 1)]
        completion = reply if isinstance(reply, Completion) else self._from_text(reply, request.sampling)
        self.completions.append(completion)
        return completion

    def _from_text(self, text: str, spec: SamplingSpec) -> Completion:
        if not isinstance(text, str):
            raise TypeError(f"a script reply must be a str or a Completion, got {type(text).__name__}")
        if self.tokenizer is None:
            raise TypeError("FakeEngine got a text reply but has no tokenizer: pass tokenizer=, or reply with a Completion")
        tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
        if self.eos_token_id is not None:
            tokens.append(self.eos_token_id)
        stops = [i for i, token in enumerate(tokens) if token in spec.stop_token_ids]
        if stops:  # a stop token ends the completion; like vLLM, it is kept
            tokens = tokens[: stops[0] + 1]
        cut = len(tokens) > spec.max_tokens
        tokens = tokens[: spec.max_tokens]
        logprobs = [-(1 + (token + position) % 10) / 10 for position, token in enumerate(tokens)]
        return Completion(token_ids=tokens, logprobs=logprobs, text=text, finish_reason="length" if cut else "stop")

    async def _load(self, name: str, lora_id: int, path: Path, kind: Literal["add", "reload"]) -> float:
        self._check_alive()
        started = time.perf_counter()
        await asyncio.sleep(self.load_s)
        tenant, version = parse_adapter_name(name)
        times, reason = self._refusals.get((tenant, version), (0, ""))
        if times is None or times > 0:
            if times is not None:
                self._refusals[(tenant, version)] = (times - 1, reason)
            raise AdapterMismatchError(f"vLLM refused adapter {str(path)!r}: {reason}")
        tensors = config = None
        if self.read_adapters:
            from safetensors.torch import load_file

            self.check_adapter(path)
            folder = read_peft_dir(path, AdapterMismatchError)
            config, tensors = folder.config, load_file(str(folder.weights_file))
        loaded = LoadedAdapter(tenant=tenant, version=version, lora_id=lora_id, name=name, path=path, kind=kind,
                               tensors=tensors, config=config)
        self.adapters.append(loaded)
        self.serving[lora_id] = loaded
        return time.perf_counter() - started
