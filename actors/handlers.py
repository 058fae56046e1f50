"""The ``@handler`` decorator and the per-class dispatch table built from handler signatures.

A handler is ``async def name(self, msg: SomeStruct) -> Reply``; the annotation of ``msg`` (a
msgspec Struct, or a union of them) decides which messages it handles. Tables are built and
checked when the Actor subclass is created, so a malformed handler fails at import time.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, overload

import msgspec

from actors.errors import ActorDefinitionError

__all__ = ["handler", "HandlerSpec", "build_dispatch_table", "union_members"]

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__actor_handler__"


@dataclass(frozen=True, slots=True)
class _HandlerOptions:
    concurrent: bool
    max_concurrency: int | None


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One handler method: how to call it and how it runs."""

    name: str
    func: Callable[[Any, Any], Any]
    concurrent: bool
    max_concurrency: int | None
    message_types: tuple[type, ...]


@overload
def handler(func: F, /) -> F: ...
@overload
def handler(*, concurrent: bool = False, max_concurrency: int | None = None) -> Callable[[F], F]: ...
def handler(func: Any = None, /, *, concurrent: bool = False, max_concurrency: int | None = None) -> Any:
    """Mark an ``async def`` method as the handler of the message type its parameter names.

    ``@handler``: sequential, one message at a time in mailbox order. ``@handler(concurrent=True)``:
    each message runs in its own task inside the actor's task group while the mailbox keeps
    draining; ``max_concurrency`` bounds how many run at once (the mailbox waits for a slot).
    """
    if max_concurrency is not None:
        if not concurrent:
            raise ActorDefinitionError("max_concurrency only applies to @handler(concurrent=True)")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ActorDefinitionError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    options = _HandlerOptions(concurrent=bool(concurrent), max_concurrency=max_concurrency)

    def mark(f: F) -> F:
        if not inspect.iscoroutinefunction(f):
            raise ActorDefinitionError(f"handler {getattr(f, '__qualname__', f)!r} must be an 'async def' method")
        setattr(f, _MARK, options)
        return f

    return mark if func is None else mark(func)


def union_members(tp: Any) -> tuple[Any, ...]:
    """``A | B`` or ``Union[A, B]`` -> ``(A, B)``; any other type -> ``(tp,)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _message_types(cls: type, name: str, func: Callable[..., Any]) -> tuple[type, ...]:
    where = f"{cls.__qualname__}.{name}"
    params = list(inspect.signature(func).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 2 or any(p.kind not in positional for p in params):
        raise ActorDefinitionError(f"handler {where} must take exactly (self, msg), got {inspect.signature(func)}")
    param = params[1]
    if param.annotation is inspect.Parameter.empty:
        raise ActorDefinitionError(f"handler {where}: annotate {param.name!r} with the message type it handles")
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:  # NameError for a forward reference that does not resolve
        raise ActorDefinitionError(
            f"handler {where}: cannot resolve the annotation {param.annotation!r} ({exc}); "
            "import the message type at module level"
        ) from exc
    members = union_members(hints[param.name])
    for tp in members:
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            raise ActorDefinitionError(f"handler {where}: {tp!r} is not a msgspec.Struct message type")
    return tuple(members)


def build_dispatch_table(cls: type, inbox: Any = None) -> dict[type, HandlerSpec]:
    """Collect the handlers of ``cls`` (and its bases) into ``{message type: HandlerSpec}``.

    A subclass method of the same name replaces (or, if not a handler, removes) the inherited
    one. Two handlers for one type, and a declared ``inbox`` union that the handlers do not
    cover exactly, are definition errors.
    """
    by_name: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if getattr(attr, _MARK, None) is not None:
                by_name[name] = attr
            elif name in by_name:
                del by_name[name]
    table: dict[type, HandlerSpec] = {}
    for name, func in by_name.items():
        options: _HandlerOptions = getattr(func, _MARK)
        message_types = _message_types(cls, name, func)
        spec = HandlerSpec(name, func, options.concurrent, options.max_concurrency, message_types)
        for tp in message_types:
            if tp in table:
                raise ActorDefinitionError(
                    f"{cls.__qualname__}: {tp.__qualname__} has two handlers, {table[tp].name} and {name}"
                )
            table[tp] = spec
    if inbox is not None:
        declared = set(union_members(inbox))
        missing = declared - table.keys()
        extra = table.keys() - declared
        if missing or extra:
            raise ActorDefinitionError(
                f"{cls.__qualname__}: handlers do not match its inbox: "
                f"no handler for {sorted(t.__qualname__ for t in missing)}, "
                f"handlers outside the inbox for {sorted(t.__qualname__ for t in extra)}"
            )
    return table
