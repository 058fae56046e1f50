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
    ) -> SampleResult:
        """Sample from this tenant's serving adapter. A string is one user message; a list of dicts a chat."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt and isinstance(prompt[0], dict):
            prompt = self.runtime.renderer.initial(prompt)
        spec = SamplingSpec(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return await self.runtime.ask(SampleRequest(tenant=self.name, prompt_token_ids=list(prompt), sampling=spec))

    async def publish(self) -> Published:
        """Make the trainer's newest version serve in the engine."""
        published = await self.runtime.ask(Publish(tenant=self.name))
        self.version = published.version
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

