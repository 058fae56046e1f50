"""conftest's ``borrow_tiny_engine`` never lets a runtime run on an engine that cannot serve it: a runtime
asking for more LoRA slots than the session engine has (which would kill that engine), or for another
base model, fails at once, before it starts anything."""

from __future__ import annotations

import msgspec
import pytest

from clora.config import EngineConfig, ModelConfig, RuntimeConfig
from clora.runtime import Runtime

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


async def test_a_runtime_the_session_engine_cannot_serve_is_refused(borrow_tiny_engine, tiny_model_dir,
                                                                    tiny_engine_config, tmp_path):
    from clora.models import tiny_llama

    fits = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), engine=tiny_engine_config,
                         run_dir=str(tmp_path / "ok"))
    Runtime(fits)
    assert borrow_tiny_engine == [tmp_path / "ok"]
    too_many = msgspec.structs.replace(fits, engine=EngineConfig(max_loras=tiny_engine_config.max_loras + 1))
    with pytest.raises(AssertionError, match="max_loras"):
        Runtime(too_many)
    other = tiny_llama(tmp_path / "other-model", seed=1)
    with pytest.raises(AssertionError, match="not the session engine's tiny model"):
        Runtime(msgspec.structs.replace(fits, model=ModelConfig(source=str(other))))
    assert borrow_tiny_engine == [tmp_path / "ok"]
