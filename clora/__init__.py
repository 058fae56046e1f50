"""clora: many LoRA adapters trained by RL on one warm base model, concurrently.

Heavy modules (torch, vLLM) load on first use: ``import clora`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from clora.config import (
    EngineConfig,
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainerConfig,
)
from clora.errors import CloraError

__all__ = [
    "Runtime",
    "TenantHandle",
    "LearnerPolicy",
    "RuntimeConfig",
    "ModelConfig",
    "EngineConfig",
    "TrainerConfig",
    "LoraConfig",
    "OptimConfig",
    "LossConfig",
    "EnvConfig",
    "ExperimentConfig",
    "CloraError",
]

_LAZY = {"Runtime": "clora.runtime", "TenantHandle": "clora.tenant.handle", "LearnerPolicy": "clora.continual.learner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clora' has no attribute {name!r}")
