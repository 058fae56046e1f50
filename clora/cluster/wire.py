"""How messages, replies and errors cross between the driver and a Ray actor host.

A value that msgspec's msgpack encodes (every message Struct without tensors, ints, lists, None) crosses as
``Wire(type name, bytes)`` and is decoded back into the same Struct type: Ray moves the bytes without
pickling anything of ours. A value holding tensors (``AdapterSnapshot``, ``StoreState`` and the messages and
replies that carry them) crosses as the object itself: Ray pickles it, and torch pickles tensors as their raw
storage (one copy, no per-element work). Errors cross pickled; clora's and the actor kernel's errors rebuild
as the same type, so the driver tells fatal from recoverable exactly as for a local actor. This module
itself never imports pickle (tests/test_bad_input_no_pickle.py): whether an error would survive Ray's
pickling is checked by rebuilding it from its reduce tuple, which is what unpickling does.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import msgspec

__all__ = ["Wire", "encode", "decode", "portable_error"]

_ENCODER = msgspec.msgpack.Encoder()
_TRUSTED_MODULES = ("clora.", "actors.")  # a Wire names a type of ours, nothing else is imported


class Wire(msgspec.Struct, frozen=True, array_like=True):
    """A msgpack-encoded value and the qualified name of its Struct type ("" for plain data)."""

    type: str
    data: bytes


def encode(value: Any) -> Any:
    """``Wire`` when msgpack can encode ``value`` (no tensors in it), else ``value`` itself (Ray pickles it)."""
    try:
        data = _ENCODER.encode(value)
    except TypeError:  # a tensor (or another object msgpack does not know): pickled by Ray
        return value
    name = f"{type(value).__module__}:{type(value).__qualname__}" if isinstance(value, msgspec.Struct) else ""
    return Wire(name, data)


def decode(value: Any) -> Any:
    """The inverse of ``encode``."""
    if not isinstance(value, Wire):
        return value
    if not value.type:
        return msgspec.msgpack.decode(value.data)
    return msgspec.msgpack.decode(value.data, type=_struct_type(value.type))


def _struct_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(_TRUSTED_MODULES):
        raise TypeError(f"refusing to decode a {name!r}: not a clora message type")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as the same type, else a RuntimeError with its type and message."""
    try:
        copy = _rebuilt(exc)
    except Exception:  # noqa: BLE001 - any failure means: send a plain description instead
        copy = None
    if type(copy) is type(exc):
        return exc
    return RuntimeError(f"{type(exc).__qualname__}: {exc}")


def _rebuilt(exc: BaseException) -> BaseException:
    """What unpickling ``exc`` would give: its class found again by module and qualified name, rebuilt from
    its reduce tuple (callable, args[, state])."""
    cls = type(exc)
    found: Any = sys.modules[cls.__module__]
    for part in cls.__qualname__.split("."):
        found = getattr(found, part)  # a class defined inside a function has no such path
    if found is not cls:
        raise TypeError(f"{cls.__qualname__} is not importable by name")
    rebuild, args, *rest = exc.__reduce_ex__(2)
    copy = rebuild(*args)
    state = rest[0] if rest else None
    if isinstance(state, dict):
        copy.__dict__.update(state)
    return copy
