"""TenantHandle: a tenant written as an async coroutine (Tinker-style primitives).

An operation is declared once, as its message in clora/messages.py: its fields are the operation's
parameters and its docstring its documentation; the actor whose declared inbox holds the message
type implements it (``Runtime.ask`` routes by that inbox). ``operation(Message)`` turns such a
message into a TenantHandle method: ``tenant.forward_backward(data, loss)`` builds
``ForwardBackward(tenant=tenant.name, data=data, loss=loss)``, asks it, and returns the reply.
Only what is more than one message (sampling a chat, publishing and remembering the version,
loading then publishing) is written out by hand below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from clora.messages import (
    ComputeLogprobs,
    ExportAdapter,
    ForwardBackward,
    ImportAdapter,
    OptimStep,
    Publish,
    Published,
    SampleRequest,
    SampleResult,
    SamplingSpec,
    TrainStep,
)

if TYPE_CHECKING:
    from clora.continual.feedback import FeedbackRecord
    from clora.continual.gate import Gate, Promotion
    from clora.continual.registry import VersionInfo
    from clora.continual.tenant import Continual
    from clora.runtime import Runtime

__all__ = ["TenantHandle", "operation"]


class operation:  # noqa: N801 - used like a decorator-made method
    """A TenantHandle method made from one tenant message type (see the module docstring).

    ``reply`` maps the actor's reply to what the method returns (default: the reply itself).
    """

    def __init__(self, message: type[msgspec.Struct], *, reply: Callable[[Any], Any] | None = None) -> None:
        self.message = message
        self.reply = reply
        fields = [f for f in msgspec.structs.fields(message) if f.name != "tenant"]
        required = [f for f in fields if f.required]
        optional = [f for f in fields if not f.required]
        self.__signature__ = inspect.Signature([
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=inspect.Parameter.empty if f.required else f.default, annotation=f.type)
            for f in (*required, *optional)
        ])
        self.__doc__ = message.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.__name__ = name

    def __get__(self, handle: TenantHandle | None, owner: type) -> Any:
        if handle is None:
            return self

        async def call(*args: Any, **kwargs: Any) -> Any:
            bound = self.__signature__.bind(*args, **kwargs)
            bound.apply_defaults()
            answer = await handle.runtime.ask(self.message(tenant=handle.name, **bound.arguments))
            return answer if self.reply is None else self.reply(answer)

        call.__name__, call.__doc__ = self.__name__, self.__doc__
        call.__signature__ = self.__signature__  # type: ignore[attr-defined]
        return call


class TenantHandle:
    """Primitives for a tenant written as an async coroutine: sample, train, publish, save, load."""

    def __init__(self, runtime: Runtime, name: str, version: int) -> None:
        self.runtime = runtime
        self.name = name
        self.version = version  # the version serving in the engine
        self._continual: Continual | None = None  # versions, aliases, feedback (rt.tenant(..., continual=...))

    forward_backward = operation(ForwardBackward)
    optim_step = operation(OptimStep)
    train_step = operation(TrainStep, reply=lambda result: result.metrics)  # -> StepMetrics
    train_step_result = operation(TrainStep)  # -> TrainStepResult, with the copies asked for
    logprobs = operation(ComputeLogprobs)

    async def sample(
        self,
        prompt: str | list[dict[str, str]] | list[int],
        *,
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        version: int | str | None = None,
        record: bool = True,
    ) -> SampleResult:
        """Sample from this tenant's adapter. A string is one user message; a list of dicts a chat.

        ``version``: None samples the serving (newest published) version; a number or an alias
        (``"production"``) samples exactly that kept version, resolved when the call starts (continual
        tenants). A continual tenant records each completion and returns its id in ``sample_ids``
        for ``feedback`` (``record=False``: not recorded)."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt and isinstance(prompt[0], dict):
            prompt = self.runtime.renderer.initial(prompt)
        spec = SamplingSpec(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=tuple(stop))
        request = SampleRequest(tenant=self.name, prompt_token_ids=list(prompt), sampling=spec)
        if self._continual is None:
            if version is not None:
                self.continual  # raises: versions need a continual tenant
            return await self.runtime.ask(request)
        return await self._continual.sample(request, version, record=record)

    # ------------------------------------------------------------------ continual learning (docs/continual.md)

    @property
    def continual(self) -> Continual:
        """This tenant's versions, feedback log and learner; ConfigError if opened without ``continual=``."""
        if self._continual is None:
            from clora.errors import ConfigError

            raise ConfigError(f"tenant {self.name!r} keeps no versions: open it with rt.tenant(name, continual=True)")
        return self._continual

    async def commit(self, alias: str | None = None) -> VersionInfo:
        """Keep the trainer's current weights as a named version on disk (``alias``: point it there too)."""
        return await self.continual.commit(alias=alias)

    def versions(self) -> list[VersionInfo]:
        """Every kept version with its lineage (parent, steps, data, scores), oldest first."""
        return self.continual.registry.versions()

    def aliases(self) -> dict[str, int]:
        """Alias -> version (``production``, ``candidate``, ...)."""
        return self.continual.registry.aliases()

    async def promote(self, version: int | str, alias: str = "production", *, gate: Gate | None = None,
                      margin: float = 0.0) -> Promotion:
        """Point ``alias`` at ``version`` if ``gate`` (an async ``gate(tenant, version) -> float`` or an Env's
        held-out set) scores it above the alias's current version by more than ``margin`` (no gate: always)."""
        return await self.continual.promote(version, alias, gate, margin)

    async def rollback(self, alias: str = "production") -> int:
        """Point ``alias`` back at the version it pointed at before, at once; returns that version."""
        return await self.continual.rollback(alias)

    async def feedback(self, sample_id: str, reward: float) -> FeedbackRecord:
        """Attach ``reward`` to a completion this tenant served (a ``sample_ids`` entry), in any order, durably."""
        return (await self.continual.feedback([(sample_id, reward)]))[0]

    async def feedback_many(self, items: list[tuple[str, float]]) -> list[FeedbackRecord]:
        """``feedback`` for several samples at once: all accepted, or none (the first bad one raises)."""
        return await self.continual.feedback(items)

    async def checkout(self, version: int | str) -> VersionInfo:
        """Set the trainer back to a kept version (weights and optimizer), so learning continues from it; it
        is kept again under a new number whose parent is ``version`` (e.g. after rolling back a bad one)."""
        return await self.continual.checkout(version)

    async def learn(self) -> VersionInfo | None:
        """Train on the pending feedback now (the background learner does this when its policy says so)."""
        return await self.continual.learn()

    async def publish(self) -> Published:
        """Make the trainer's newest version serve in the engine."""
        published = await self.runtime.ask(Publish(tenant=self.name))
        self.version = published.version
        if self._continual is not None:  # every published version of a continual tenant is kept
            await self._continual.commit()
        return published

    async def save(self, out_dir: str | Path) -> Path:
        """Write the trainer's current adapter as a PEFT directory."""
        await self.runtime.ask(ExportAdapter(tenant=self.name, out_dir=str(out_dir)))
        return Path(out_dir)

    async def load(self, path: str | Path) -> Published:
        """Replace this tenant's weights with a PEFT directory, then publish them."""
        await self.runtime.ask(ImportAdapter(tenant=self.name, path=str(path)))
        return await self.publish()

    def set_priority(self, priority: int | None = None, weight: float | None = None) -> None:
        """Change this tenant's scheduling class and / or its weight within it (None keeps one); the
        next decision of the engine's admission and the trainer's step queue uses them (docs/scheduling.md)."""
        self.runtime.set_priority(self.name, priority, weight)

    async def close(self) -> None:
        """Write the adapter to ``<run_dir>/tenants/<name>/adapter`` (where ``clora export`` finds it),
        unload it from the engine and drop the tenant's trainer state; the name is free again. Closing
        twice does nothing; the runtime's exit closes a handle left open."""
        await self.runtime.close_tenant(self.name)

