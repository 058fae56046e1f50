"""The Actor base class: lifecycle hooks, identity, and handler tables checked at class creation."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from actors.errors import ActorDefinitionError, UnknownMessage
from actors.handlers import HandlerSpec, build_dispatch_table
from actors.mailbox import check_capacity

if TYPE_CHECKING:
    from actors.ref import ActorRef

__all__ = ["Actor"]

_UNSTARTED = "<unstarted>"


class Actor:
    """Subclass, declare handlers with ``@handler``, start with ``await system.start(...)``.

    Class attributes: ``mailbox_size`` (bounded, >= 1) and optionally ``inbox``, the union of
    message types this actor accepts (checked against the handlers when the class is created).
    Inside an actor: ``self.name``, ``self.log`` (structlog, bound with the actor's name) and
    ``self.ref`` (this actor's own ref) are set before ``on_start`` runs.
    """

    mailbox_size: ClassVar[int] = 64
    inbox: ClassVar[Any] = None
    __handlers__: ClassVar[dict[type, HandlerSpec]] = {}

    _actor_name: str = _UNSTARTED
    _actor_log: Any = None
    _actor_ref: ActorRef[Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_capacity(cls.mailbox_size, cls.__qualname__)
        for hook in ("on_start", "on_stop", "on_failure"):
            if not inspect.iscoroutinefunction(getattr(cls, hook)):
                raise ActorDefinitionError(f"{cls.__qualname__}.{hook} must be an 'async def' method")
        cls.__handlers__ = build_dispatch_table(cls, cls.inbox)

    # ------------------------------------------------------------------ hooks

    async def on_start(self) -> None:
        """Runs before the first message; an exception here raises out of ``system.start``."""

    async def on_stop(self) -> None:
        """Runs once after a clean stop (drain or abort, or the system shutting down)."""

    async def on_failure(self, exc: BaseException) -> None:
        """Runs once when this instance crashed (instead of on_stop), before its supervision acts."""

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self._actor_name

    @property
    def log(self) -> Any:
        if self._actor_log is None:
            return structlog.get_logger("actors").bind(actor=self._actor_name)
        return self._actor_log

    @property
    def ref(self) -> ActorRef[Any]:
        if self._actor_ref is None:
            raise AttributeError(f"{type(self).__qualname__} has no ref before it is started")
        return self._actor_ref

    @property
    def attached(self) -> bool:
        return self._actor_ref is not None

    def _attach(self, name: str, log: Any, ref: ActorRef[Any]) -> None:
        self._actor_name = name
        self._actor_log = log
        self._actor_ref = ref

    # ------------------------------------------------------------------ dispatch

    @classmethod
    def handler_for(cls, message: Any, actor_name: str) -> HandlerSpec:
        """The handler of ``type(message)`` (or of its nearest base class); UnknownMessage if none."""
        table = cls.__handlers__
        for klass in type(message).__mro__:
            spec = table.get(klass)
            if spec is not None:
                return spec
        raise UnknownMessage(actor_name, type(message), tuple(table))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self._actor_name}>"
