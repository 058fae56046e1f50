"""Config Structs: validation errors name the field; TOML round trip; unknown keys rejected."""

import re

import pytest

from clora.config import (
    EngineConfig,
    ExperimentConfig,
    LoraConfig,
    OptimConfig,
    RuntimeConfig,
    TrainerConfig,
    decode_config,
    dump_toml,
    load_toml,
    validate_tenant_name,
)
from clora.errors import ConfigError


def test_toml_round_trip_keeps_every_field():
    cfg = RuntimeConfig(
        engine=EngineConfig(max_loras=4, max_cpu_loras=8),
        experiments=(ExperimentConfig(name="a", optim=OptimConfig(lr=3e-4, grad_clip=0.0)), ExperimentConfig(name="b")),
    )
    assert decode_config(dump_toml(cfg)) == cfg


@pytest.mark.parametrize(
    "toml, field",
    [
        (b"[model]\nsourc = 'tiny'\n", "sourc"),
        (b"[engine]\nmax_loras = 'four'\n", "max_loras"),
        (b"[engine]\nmax_loras = 0\n", "engine.max_loras"),
        (b"[engine]\nblock_size = 24\n", "engine.block_size"),
        (b"[trainer]\nqueue_size = 0\n", "trainer.queue_size"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\nlr = -1.0\n", "optim.lr"),
        (b"[[experiments]]\nname = 'a'\n[experiments.lora]\nrank = 64\n", "lora.rank"),
        (b"[[experiments]]\nname = 'a'\n[[experiments]]\nname = 'a'\n", "duplicate"),
        (b"[[experiments]]\nname = 'a/b'\n", "tenant name"),
        (b"[[experiments]]\nname = '..'\n", "tenant name"),
        (b"[model\n", "malformed"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\nlr_schedule = 'step'\n", "lr_schedule"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\nwarmup_steps = -1\n", "optim.warmup_steps"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\nmin_lr_ratio = 1.5\n", "optim.min_lr_ratio"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\ntotal_steps = 0\n", "optim.total_steps"),
        (b"[[experiments]]\nname = 'a'\nsteps = 3\n[experiments.optim]\nwarmup_steps = 4\n",
         "experiments[0].optim.warmup_steps: must be <= steps (3"),
        (b"[[experiments]]\nname = 'a'\n[experiments.optim]\nwarmup_steps = 4\ntotal_steps = 2\n",
         "optim.warmup_steps: must be <= total_steps (2)"),
        (b"[[experiments]]\nname = 'a'\n[experiments.loss]\nnormalize = 'dr_grpo'\n", "loss.normalize"),
        (b"[[experiments]]\nname = 'a'\n[experiments.loss]\nnormalize_constant = 0.0\n", "loss.normalize_constant"),
        (b"[[experiments]]\nname = 'a'\n[experiments.loss]\nkl_estimator = 'k2'\n", "loss.kl_estimator"),
        (b"[[experiments]]\nname = 'a'\n[experiments.loss]\nkind = 'cross_entropy'\nkl_coef = 0.1\n",
         "experiments[0].loss.kl_coef: must be 0 for kind 'cross_entropy'"),
    ],
)
def test_bad_config_names_the_problem(toml, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        decode_config(toml)


def test_every_optional_field_defaults_to_none_so_dropping_none_in_toml_is_lossless():
    import typing

    import msgspec

    from clora import config as mod

    for struct in (mod.ModelConfig, mod.EngineConfig, mod.LoraConfig, mod.OptimConfig, mod.LossConfig,
                   mod.TrainerConfig, mod.EnvConfig, mod.ExperimentConfig, mod.RuntimeConfig):
        for field in msgspec.structs.fields(struct):
            if type(None) in typing.get_args(field.type):
                assert field.default is None, f"{struct.__name__}.{field.name}"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["a/b", "../x", "", ".hidden", "a" * 65, "x\\y"])
def test_tenant_names_that_could_escape_a_folder_are_refused(name):
    with pytest.raises(ConfigError):
        validate_tenant_name(name)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        EngineConfig(max_loras=8, max_cpu_loras=2)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        TrainerConfig(micro_batch_size=0)
    assert LoraConfig(rank=8, alpha=16).scaling == 2.0


def test_an_experiment_gives_its_schedule_its_steps():
    exp = ExperimentConfig(name="a", steps=12, optim=OptimConfig(lr_schedule="cosine", warmup_steps=2))
    assert exp.optim.total_steps is None and exp.resolved_optim.total_steps == 12
    assert exp.resolved_optim.lr_schedule == "cosine" and exp.resolved_optim.warmup_steps == 2
    own = ExperimentConfig(name="b", steps=12, optim=OptimConfig(lr_schedule="linear", total_steps=40))
    assert own.resolved_optim.total_steps == 40  # a length set explicitly wins


def test_an_experiment_gives_constant_normalisation_its_max_tokens():
    from clora.config import LossConfig

    exp = ExperimentConfig(name="a", max_tokens=96, loss=LossConfig(kind="cispo", normalize="constant"))
    assert exp.loss.normalize_constant is None and exp.resolved_loss.normalize_constant == 96.0
    assert exp.resolved_loss.kind == "cispo"
    own = ExperimentConfig(name="b", loss=LossConfig(normalize="constant", normalize_constant=512))
    assert own.resolved_loss.normalize_constant == 512.0
    assert ExperimentConfig(name="c").resolved_loss == LossConfig()  # other normalisations are passed as they are
