"""The error tree. One root, each error also the stdlib type it replaces.

Fatal errors (``FatalError``) mean the runtime cannot go on (the engine died); everything
else under ``TenantError`` is recoverable and concerns one tenant or one request only.
"""

from __future__ import annotations

__all__ = [
    "CloraError",
    "ConfigError",
    "ModelNotFoundError",
    "AdapterMismatchError",
    "FatalError",
    "EngineDeadError",
    "TenantError",
    "UnknownTenantError",
    "DuplicateTenantError",
    "PromptTooLongError",
    "NonFiniteError",
    "PublishError",
    "EnvError",
    "CheckpointError",
]


class CloraError(Exception):
    """Root of every error clora raises on purpose."""


class ConfigError(CloraError, ValueError):
    """A configuration or input value is invalid; the message names the field."""


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """A base model (directory, file, or packaged wheel) is missing or incomplete."""


class CheckpointError(CloraError, ValueError):
    """A checkpoint is missing, truncated, corrupt or of another format; it was not loaded."""


class AdapterMismatchError(ConfigError):
    """An adapter does not fit the base model or the engine (rank, target modules, base model)."""


class FatalError(CloraError, RuntimeError):
    """The runtime cannot continue; every tenant stops."""


class EngineDeadError(FatalError):
    """The vLLM engine process died or stopped answering."""


class TenantError(CloraError):
    """A recoverable failure that concerns one tenant (or one of its requests) only."""


class UnknownTenantError(TenantError, KeyError):
    """A request names a tenant that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown tenant"


class DuplicateTenantError(TenantError, ValueError):
    """A tenant with this name already exists."""


class PromptTooLongError(TenantError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class NonFiniteError(TenantError, FloatingPointError):
    """A loss, gradient or reward was NaN or infinite; the step was rejected, nothing changed."""


class PublishError(TenantError, RuntimeError):
    """A new adapter version could not be loaded into the engine; the previous one still serves."""


class EnvError(TenantError, RuntimeError):
    """The environment (reset, step, tool call or reward) raised or returned garbage."""
