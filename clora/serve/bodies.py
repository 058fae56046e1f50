"""Reading a request: the server's state, and a JSON body decoded into a msgspec type (one clear 400
naming the route when it does not fit)."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from fastapi import Request

from clora.errors import ConfigError
from clora.serve.state import ServeState

__all__ = ["read_json", "serve_state"]

T = TypeVar("T")


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


async def read_json(request: Request, type_: type[T], *, empty_is_object: bool = False) -> T:
    """The body as ``type_``; ``empty_is_object``: an empty body reads as ``{}`` (routes whose fields all
    have defaults)."""
    raw = await request.body()
    try:
        return msgspec.json.decode(raw or (b"{}" if empty_is_object else raw), type=type_)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{request.url.path}: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{request.url.path}: the body is not valid JSON ({e})") from None
