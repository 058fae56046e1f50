"""Fast tests of the engine wrapper's pure parts: environment, adapter checks, zero adapter, error mapping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clora.config import EngineConfig, ModelConfig
from clora.sampler import cpu_lora_ops
from clora.sampler.engine import (
    Engine,
    _cpu_list,
    check_adapter,
    engine_args,
    engine_env,
    engine_environment,
    write_zero_adapter,
)
from clora.errors import AdapterMismatchError, EngineDeadError, PromptTooLongError
from clora.messages import SamplingSpec


def test_engine_args_pass_the_block_size_only_when_set():
    model = ModelConfig(source="tiny")
    assert engine_args(Path("m"), model, EngineConfig(block_size=32)).block_size == 32
    assert engine_args(Path("m"), model, EngineConfig()).block_size is None  # vLLM picks (128 on CPU)
    args = engine_args(Path("m"), model, EngineConfig(max_loras=3))
    assert args.max_loras == 4 and args.enable_logging_iteration_details  # + the zero adapter; stats need details


def test_cpu_list_compresses_runs():
    assert _cpu_list({0, 1}) == "0-1"
    assert _cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert _cpu_list({3}) == "3"


def test_engine_env_defaults_user_env_and_extra_env_precedence():
    cfg = EngineConfig(kv_cache_gib=1.5, omp_threads_bind="0", use_tcmalloc=False)
    env = engine_env(cfg, environ={})
    assert env == {
        "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
        "CLORA_VLLM_CPU_LORA_OPS": "1", "CLORA_ENGINE_OWNER_PID": str(os.getpid()),
    }
    # the owner pid is this process's, even when an inherited environment names another
    assert engine_env(cfg, environ={"CLORA_ENGINE_OWNER_PID": "1"})["CLORA_ENGINE_OWNER_PID"] == str(os.getpid())
    # the user's environment wins over clora's defaults: those keys are left alone
    env = engine_env(cfg, environ={"VLLM_CPU_KVCACHE_SPACE": "9"})
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    # extra_env wins over everything
    cfg = EngineConfig(use_tcmalloc=False, extra_env={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert engine_env(cfg, environ={"VLLM_CPU_KVCACHE_SPACE": "9"})["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_engine_env_binds_all_usable_cores_by_default():
    import os

    env = engine_env(EngineConfig(use_tcmalloc=False), environ={})
    bound = set()
    for part in env["VLLM_CPU_OMP_THREADS_BIND"].split(","):
        lo, _, hi = part.partition("-")
        bound |= set(range(int(lo), int(hi or lo) + 1))
    assert bound == os.sched_getaffinity(0)


def test_preloaded_libraries_exist_and_force_spawn():
    env = engine_env(EngineConfig(use_tcmalloc=True), environ={})
    if "LD_PRELOAD" not in env:
        pytest.skip("neither tcmalloc nor libiomp5 is installed here")
    assert all(Path(lib).is_file() for lib in env["LD_PRELOAD"].split(":"))
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"  # a forked process would ignore LD_PRELOAD
    assert "LD_PRELOAD" not in engine_env(EngineConfig(use_tcmalloc=True), environ={"LD_PRELOAD": "/x.so"})


_CLORA_KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE",
               "VLLM_WORKER_MULTIPROC_METHOD", "LD_PRELOAD", cpu_lora_ops.ENV_FLAG, "CLORA_ENGINE_OWNER_PID")


@pytest.fixture
def user_env(monkeypatch) -> pytest.MonkeyPatch:
    """A user environment without any variable clora sets for the engine (restored after the test)."""
    for key in _CLORA_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_engine_environment_is_set_for_the_body_only_and_each_engine_reads_the_users_env(user_env):
    before = dict(os.environ)
    with engine_environment(EngineConfig(kv_cache_gib=3, use_tcmalloc=True)) as env:
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == env["VLLM_CPU_KVCACHE_SPACE"] == "3"
        os.environ["LD_PRELOAD"] = os.environ.get("LD_PRELOAD", "") + ":/vllm/libs/libtcmalloc.so"  # as vLLM does
    assert dict(os.environ) == before
    with engine_environment(EngineConfig(kv_cache_gib=5, use_tcmalloc=False)):
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "5"  # not the first engine's 3
        assert "LD_PRELOAD" not in os.environ
    assert dict(os.environ) == before
    user_env.setenv("VLLM_CPU_KVCACHE_SPACE", "7")  # the user's own setting wins, and stays
    with engine_environment(EngineConfig(kv_cache_gib=5, use_tcmalloc=False)):
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"


class _StartedLLM:
    """An AsyncLLM stand-in that records the environment it was constructed in (as vLLM reads it)."""

    errored = False
    seen: list[dict[str, str]] = []
    stat_loggers: list[list] = []

    @classmethod
    def from_engine_args(cls, args, stat_loggers=None) -> _StartedLLM:
        cls.seen.append(dict(os.environ))
        cls.stat_loggers.append(list(stat_loggers or []))
        os.environ["LD_PRELOAD"] = os.environ.get("LD_PRELOAD", "") + ":/vllm/libs/libgomp.so"  # as vLLM does
        return cls()

    async def add_lora(self, request) -> bool:
        return True

    async def pin_lora(self, lora_id: int) -> bool:
        return True

    def shutdown(self) -> None:
        pass


async def test_two_engines_started_in_one_process_each_get_their_own_environment(
    user_env, tiny_model_dir, tmp_path
):
    from vllm.v1.engine.async_llm import AsyncLLM

    from clora.config import ModelConfig

    user_env.setattr(AsyncLLM, "from_engine_args", _StartedLLM.from_engine_args)
    user_env.setattr(_StartedLLM, "seen", [])
    user_env.setattr(_StartedLLM, "stat_loggers", [])
    before = dict(os.environ)
    engines = []
    for gib in (3, 5):
        cfg = EngineConfig(kv_cache_gib=gib, use_tcmalloc=False)
        engines.append(await Engine.start(tiny_model_dir, ModelConfig(), cfg, work_dir=tmp_path / str(gib)))
        assert dict(os.environ) == before  # nothing of the engine's start stays in this process
    assert [seen["VLLM_CPU_KVCACHE_SPACE"] for seen in _StartedLLM.seen] == ["3", "5"]
    assert all(seen["CLORA_ENGINE_OWNER_PID"] == str(os.getpid()) for seen in _StartedLLM.seen)
    # the grouped ops are on for these engines (clora's default), though this process's env lacks the flag
    assert all(engine.base_rows_without_lora for engine in engines)
    # each engine hands vLLM one stat logger, and it feeds that engine's own counters
    from vllm.v1.metrics.stats import IterationStats

    assert [len(loggers) for loggers in _StartedLLM.stat_loggers] == [1, 1]
    iteration = IterationStats()
    iteration.prompt_token_stats.total = 7
    _StartedLLM.stat_loggers[1][0](None, 0).record(None, iteration)
    assert [engine.stats.snapshot().prompt_tokens for engine in engines] == [0, 7]
    for engine in engines:
        engine.shutdown()


def _adapter(tmp_path: Path, **config) -> Path:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], **config}))
    return tmp_path


def test_check_adapter_names_each_problem(tmp_path):
    with pytest.raises(AdapterMismatchError, match="adapter_config.json"):
        check_adapter(tmp_path, max_rank=16)
    with pytest.raises(AdapterMismatchError, match="rank 32 > engine.max_lora_rank 16"):
        check_adapter(_adapter(tmp_path, r=32), max_rank=16)
    with pytest.raises(AdapterMismatchError, match="conv1"):
        check_adapter(_adapter(tmp_path, target_modules=["q_proj", "model.layers.0.conv1"]), max_rank=16)
    check_adapter(_adapter(tmp_path, target_modules=["q_proj", "down_proj"]), max_rank=16)


def test_zero_adapter_is_all_zero_with_the_model_shapes(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    out = write_zero_adapter(tiny_model_dir, tmp_path / "zero")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    a, b = (tensors[k] for k in sorted(tensors))  # lora_A [r, in], lora_B [out, r]
    assert a.shape == (1, config["hidden_size"])
    assert b.shape == (config["num_attention_heads"] * config["head_dim"], 1)
    assert all(not t.any() for t in tensors.values())
    check_adapter(out, max_rank=1)


class _DeadLLM:
    """An AsyncLLM stand-in whose engine process died."""

    errored = False

    async def generate(self, *args, **kwargs):
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        self.errored = True
        raise VllmEngineDeadError()
        yield  # an async generator, like AsyncLLM.generate

    async def add_lora(self, request):
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        raise VllmEngineDeadError()


def _engine(llm) -> Engine:
    engine = Engine(llm, model_dir=Path("m"), max_model_len=64, max_lora_rank=16)
    engine._zero_dir = Path("zero")
    return engine


async def test_vllm_engine_death_becomes_clora_engine_dead_error(tmp_path):
    engine = _engine(_DeadLLM())
    with pytest.raises(EngineDeadError, match="died"):
        await engine.generate([1, 2, 3], SamplingSpec(max_tokens=4), None)
    with pytest.raises(EngineDeadError):  # known dead: refused before reaching vLLM
        await engine.generate([1, 2, 3], SamplingSpec(max_tokens=4), None)
    with pytest.raises(EngineDeadError):
        await engine.reload_adapter("t@v1", 2, _adapter(tmp_path))


async def test_prompt_checks_happen_before_the_engine():
    engine = _engine(_DeadLLM())
    with pytest.raises(PromptTooLongError, match="60 tokens \\+ max_tokens 5 = 65 exceeds .* 64"):
        await engine.generate([1] * 60, SamplingSpec(max_tokens=5), None)
    with pytest.raises(PromptTooLongError, match="empty"):
        await engine.generate([], SamplingSpec(max_tokens=5), None)
