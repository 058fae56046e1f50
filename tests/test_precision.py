"""clora.precision: bf16 only where the hardware computes it natively ("auto" settings)."""

from __future__ import annotations

import pytest

from clora.config import ModelConfig, TrainerConfig, decode_config
from clora.errors import ConfigError
from clora.precision import cpu_has_bf16, engine_dtype, trainer_autocast_bf16

AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx avx2 fma bmi2\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_cpu_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_bf16(AVX2_EPYC)
    assert cpu_has_bf16(SAPPHIRE_RAPIDS) and cpu_has_bf16(COOPER_LAKE)
    assert not cpu_has_bf16("")  # no /proc/cpuinfo: no claim of bf16


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_auto_resolves_by_hardware_and_explicit_settings_win(monkeypatch, cpu_bf16):
    monkeypatch.setattr("clora.precision.cpu_has_bf16", lambda cpuinfo=None: cpu_bf16)
    assert engine_dtype("auto", cuda=False) == ("bfloat16" if cpu_bf16 else "float32")
    assert engine_dtype("auto", cuda=True) == "bfloat16"
    assert engine_dtype("float32", cuda=True) == "float32" and engine_dtype("bfloat16", cuda=False) == "bfloat16"
    assert trainer_autocast_bf16("auto", "cpu") is cpu_bf16
    assert trainer_autocast_bf16("auto", "cuda", cuda_bf16=True) is True
    assert trainer_autocast_bf16("auto", "cuda", cuda_bf16=False) is False
    assert trainer_autocast_bf16(True, "cpu") is True and trainer_autocast_bf16(False, "cuda", True) is False


def test_auto_is_a_valid_setting_and_other_strings_are_not():
    assert ModelConfig(dtype="auto").dtype == "auto" and TrainerConfig(autocast_bf16="auto").autocast_bf16 == "auto"
    cfg = decode_config('[model]\ndtype = "auto"\n[trainer]\nautocast_bf16 = "auto"\n')
    assert (cfg.model.dtype, cfg.trainer.autocast_bf16) == ("auto", "auto")
    with pytest.raises(ConfigError, match="autocast_bf16"):
        decode_config('[trainer]\nautocast_bf16 = "sometimes"\n')
