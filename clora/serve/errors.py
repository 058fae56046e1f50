"""One JSON error body per refused request, and the HTTP status of each clora error."""

from __future__ import annotations

from clora.errors import (
    AdapterMismatchError,
    CloraError,
    ConfigError,
    DuplicateTenantError,
    FatalError,
    NonFiniteError,
    PromptTooLongError,
    ServeError,
    UnknownSampleError,
    UnknownTenantError,
    UnknownVersionError,
)

__all__ = ["error_body", "error_message", "status_of"]


def status_of(error: BaseException) -> int:
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, (UnknownTenantError, UnknownVersionError, UnknownSampleError)):
        return 404
    if isinstance(error, DuplicateTenantError):
        return 409
    if isinstance(error, (ConfigError, AdapterMismatchError, PromptTooLongError, NonFiniteError)):
        return 400
    if isinstance(error, FatalError):
        return 503
    if isinstance(error, CloraError):
        return 400
    return 500


def error_message(error: BaseException) -> str:
    if isinstance(error, CloraError):
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        return text
    return f"internal error ({type(error).__name__}); see the server's events"


def error_body(error: BaseException) -> dict:
    """The OpenAI error shape, which the tinker SDK also reads: ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": error_message(error), "type": type(error).__name__, "code": status_of(error)}}
