"""Whether bf16 pays on this hardware, for the settings that say ``"auto"``.

bf16 halves memory traffic, but a CPU without bf16 instructions (no AVX512_BF16 and no AMX, e.g. an
AVX2-only AMD EPYC) converts every operand and computes in fp32: measured on such a 2-core EPYC
(2026-11-30), a SmolLM2 bf16 vLLM engine took 62-65 s for 32 requests x 32 tokens where fp32 took
13.5 s. CUDA devices with bf16 support (compute capability 8.0+) and CPUs with those instructions
gain from it. torch is imported only to resolve "auto" on the engine side.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

__all__ = ["CPU_BF16_FLAGS", "cpu_has_bf16", "engine_dtype", "trainer_autocast_bf16"]

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of CPUs with native bf16 arithmetic (oneDNN and vLLM-CPU use them)."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """The CPU has native bf16 arithmetic (``cpuinfo``: /proc/cpuinfo's text; read when None)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("flags"):
            return not CPU_BF16_FLAGS.isdisjoint(line.partition(":")[2].split())
    return False


@cache
def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def engine_dtype(
    dtype: Literal["float32", "bfloat16", "auto"], cuda: bool | None = None
) -> Literal["float32", "bfloat16"]:
    """ModelConfig.dtype resolved: "auto" is bfloat16 on CUDA or a CPU with bf16 instructions, else float32.
    ``cuda``: whether the engine runs on CUDA (None: torch sees a CUDA device; imported only for "auto")."""
    if dtype != "auto":
        return dtype
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "bfloat16" if cuda or cpu_has_bf16() else "float32"


def trainer_autocast_bf16(setting: bool | Literal["auto"], device_type: str, cuda_bf16: bool = False) -> bool:
    """TrainerConfig.autocast_bf16 resolved for the trainer's device ("cpu" / "cuda"); ``cuda_bf16``:
    the CUDA device supports bf16."""
    if setting != "auto":
        return bool(setting)
    return cuda_bf16 if device_type == "cuda" else cpu_has_bf16()
