"""The error tree. One root, each error also the stdlib type it replaces.

Fatal errors (``FatalError``) mean the runtime cannot go on (the engine died); everything
else under ``TenantError`` is recoverable and concerns one tenant or one request only.
"""

from __future__ import annotations

import re

import msgspec
import msgspec.inspect as mi

__all__ = [
    "CloraError",
    "ConfigError",
    "ModelNotFoundError",
    "AdapterMismatchError",
    "FatalError",
    "EngineDeadError",
    "HostDiedError",
    "TenantError",
    "UnknownTenantError",
    "DuplicateTenantError",
    "PromptTooLongError",
    "NonFiniteError",
    "PublishError",
    "ServeError",
    "AccessDeniedError",
    "NotFoundError",
    "UnsupportedError",
    "PayloadTooLargeError",
    "ClientDisconnectedError",
    "EnvError",
    "StaleDataError",
    "UnknownVersionError",
    "UnknownSampleError",
    "FeedbackError",
    "CheckpointError",
    "describe_validation_error",
    "field_error",
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


class HostDiedError(FatalError):
    """The Ray actor (process) hosting the sampler or the trainer died or became unreachable."""


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


class StaleDataError(TenantError, ValueError):
    """A TrainStep's data is older than its staleness bound allows (``stale_policy="resample"``), or
    carries no sampler version under a bound; the step was rejected, the adapter is unchanged.
    ``stale`` holds the indices of the offending data in the step."""

    def __init__(self, message: str, stale: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.stale = stale


class UnknownVersionError(TenantError, KeyError):
    """A request names a version or an alias the tenant does not have (or an alias with nothing to roll back to)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown version"


class UnknownSampleError(TenantError, KeyError):
    """Feedback names a sample id this tenant never served, or one older than its feedback window (expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown sample"


class FeedbackError(TenantError, ValueError):
    """Feedback is malformed: a non-finite reward, or a second, different reward for the same sample."""


class ServeError(CloraError):
    """An HTTP request to ``clora serve`` was refused; ``status`` is the HTTP status it answers with."""

    status: int = 400


class AccessDeniedError(ServeError, PermissionError):
    """The request's API key is missing, unknown, or not allowed this tenant (the message says nothing
    about the tenant)."""

    status = 403


class NotFoundError(ServeError, LookupError):
    """A request names a model, tenant, checkpoint or future the server does not have (for this key)."""

    status = 404


class UnsupportedError(ServeError, NotImplementedError):
    """A request asks for a feature clora does not support; the message names the feature."""

    status = 400


class PayloadTooLargeError(ServeError, ValueError):
    """A request body is larger than the server's limit (``--max-body-bytes``)."""

    status = 413


class ClientDisconnectedError(ServeError, ConnectionError):
    """The client closed its connection before its answer came; its request was cancelled (the engine
    aborted it). No one reads the answer: the status (nginx's 499) is for the server's events."""

    status = 499


# ----------------------------------------------------------------------------- config errors
# One clear ``ConfigError`` per bad config, naming the dotted field path.
#
# msgspec reports a decode problem as ``Expected `int`, got `str` - at `$.experiments[1].optim.lr```,
# and a failed ``validate()`` as the error it raised plus the path of its Struct. Both become
# ``experiments[1].optim.lr: expected int, got str`` (unknown fields list the valid ones, bad
# ``Literal`` values the allowed ones).

_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+|\.\.\.)\]")


def field_error(field: str, problem: str, *, message: str | None = None, local: str | None = None) -> ConfigError:
    """A ConfigError that remembers its field (as written by the Struct) and its problem.

    ``local``: the field's path inside the Struct that checks it (default the last part of
    ``field``), e.g. "optim.warmup_steps" for a check ExperimentConfig makes on its optim.
    """
    error = ConfigError(message if message is not None else f"{field}: {problem}")
    error.field = field
    error.local = local if local is not None else field.rsplit(".", 1)[-1]
    error.problem = problem
    return error


def _unwrap(info: mi.Type | None) -> mi.Type | None:
    """``X | None`` -> X."""
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if len(others) == 1:
            return others[0]
    return info


def _type_at(type_: type, path: str) -> mi.Type | None:
    """The msgspec type found at a msgspec path like ``.experiments[1].optim`` (None: unknown)."""
    info: mi.Type | None = mi.type_info(type_)
    for name, index in _STEP.findall(path):
        info = _unwrap(info)
        if name:
            if not isinstance(info, mi.StructType):
                return None
            info = next((f.type for f in info.fields if f.encode_name == name), None)
        elif isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
            info = info.item_type
        elif isinstance(info, mi.DictType):
            info = info.value_type
        elif isinstance(info, mi.TupleType) and index.isdigit() and int(index) < len(info.item_types):
            info = info.item_types[int(index)]
        else:
            return None
        if info is None:
            return None
    return _unwrap(info)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def describe_validation_error(error: msgspec.ValidationError, type_: type) -> str:
    """``<dotted field path>: <problem>`` for a ValidationError from decoding ``type_``."""
    match = _AT.match(str(error))
    message, path = match["message"], match["path"] or ""
    where = path.lstrip(".")
    cause = error.__cause__
    if isinstance(cause, ConfigError) and hasattr(cause, "field"):
        # A Struct's validate() names its fields as "optim.lr" or "experiments.<name>.steps"; the
        # decoder knows where that Struct sits, so the path is where + the field's own name.
        field = cause.local if where else cause.field
        return f"{_join(where, field)}: {cause.problem}"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        info = _type_at(type_, path)
        valid = ", ".join(f.encode_name for f in info.fields) if isinstance(info, mi.StructType) else "?"
        return f"{_join(where, found[1])}: unknown field; valid fields here: {valid}"
    if found := re.fullmatch(r"Object missing required field `(.+)`", message):
        return f"{_join(where, found[1])}: missing; this field is required"
    if found := re.match(r"Expected `(.+?)`, got `(.+?)`", message):
        return f"{where or '(top level)'}: expected {found[1]}, got {found[2]}"
    if found := re.fullmatch(r"Invalid enum value (.+)", message):
        info = _type_at(type_, path)
        allowed = ", ".join(repr(v) for v in info.values) if isinstance(info, mi.LiteralType) else "?"
        return f"{where}: invalid value {found[1]}; use one of {allowed}"
    return f"{where}: {message}" if where else message
