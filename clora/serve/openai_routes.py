"""The OpenAI inference API (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``).

``model`` is the base model's name, a tenant (its serving version) or ``tenant@version`` (only the
serving version: clora keeps one version of a tenant in the engine). A continual tenant
(docs/continual.md) keeps named versions: ``tenant`` samples its ``production`` alias,
``tenant@alias``, ``tenant@7`` or ``tenant@v7`` exactly that version; the answer names the version in
``system_fingerprint`` (``tenant@v7``) and carries ``sample_ids`` (one per choice) for ``/v1/feedback``.
Requests of every tenant go to the same sampler as training rollouts and decode in its mixed-adapter
batches. Streaming sends the completion token by token once the sampler returned it (the sampler
answers whole completions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from clora.continual.tenant import PRODUCTION
from clora.errors import ClientDisconnectedError, ConfigError, NotFoundError, UnsupportedError
from clora.messages import SampleRequest, SampleResult, SamplingSpec
from clora.serve import openai_wire as wire
from clora.serve.bodies import read_json, serve_state
from clora.serve.errors import error_body
from clora.serve.state import ServeState

__all__ = ["router"]

router = APIRouter(prefix="/v1")
DEFAULT_MAX_TOKENS = 128


Target = tuple[str | None, str | None]  # (tenant or None for the base model, a continual tenant's version)


def _resolve(state: ServeState, request: Request, model: str) -> Target:
    """The tenant a ``model`` names (None: the base model) and, for a continual tenant, the version or
    alias to pin; 403 / 404 as the key allows."""
    if model == state.base_model:
        return None, None
    name, at, version = model.partition("@")
    handle = state.tenant(request.state.principal, name)
    if handle._continual is not None:
        if at and not version:
            raise ConfigError(f"model {model!r}: name a version or an alias after '@'")
        return name, version if at else PRODUCTION
    if version and version != str(handle.version):
        raise NotFoundError(f"model {model!r}: version {version} is not serving (serving: {name}@{handle.version})")
    return name, None


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state, principal = serve_state(request), request.state.principal
    rows = [{"id": state.base_model, "object": "model", "owned_by": "clora", "created": 0}]
    for name, handle in sorted(state.tenants.items()):
        if state.may_use(principal, name):
            rows.append({"id": name, "object": "model", "owned_by": "clora", "created": 0,
                         "root": state.base_model, "version": handle.version})
    return {"object": "list", "data": rows}


def _spec(body: wire._Common, prompt_len: int, max_model_len: int) -> SamplingSpec:
    if body.logprobs not in (None, False) or body.tools:
        raise UnsupportedError("logprobs / tools in OpenAI requests are not supported by clora serve")
    wanted = body.max_completion_tokens or body.max_tokens
    max_tokens = wanted if wanted is not None else max(1, min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len))
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return SamplingSpec(n=body.n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed,
                        stop=body.stops())


async def _sample(state: ServeState, request: Request, target: Target, prompt: list[int],
                  spec: SamplingSpec) -> SampleResult:
    """The sampler's answer (a continual tenant's: from the pinned version). A client that disconnects before
    it comes cancels its request: the sampler drops it and the engine aborts it, so its decode slots go to
    the other requests."""
    sampling = asyncio.ensure_future(_ask(state, target, prompt, spec))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({sampling, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not sampling.done():
            sampling.cancel()
    if sampling.cancelled() or not sampling.done():
        with contextlib.suppress(asyncio.CancelledError):
            await sampling  # the abort has reached the engine when this returns
        raise ClientDisconnectedError(f"the client disconnected before its answer came; model {target[0] or 'base'!r}, "
                                      "request cancelled")
    return sampling.result()


async def _ask(state: ServeState, target: Target, prompt: list[int], spec: SamplingSpec) -> SampleResult:
    tenant, version = target
    request = SampleRequest(tenant=tenant, prompt_token_ids=prompt, sampling=spec)
    if version is None:
        return await state.runtime.ask(request)
    return await state.tenants[tenant].continual.sample(request, version, record=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body is read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _extra(target: Target, result: SampleResult) -> dict[str, Any]:
    """What a continual tenant's answer adds: the version that served it and the sample ids for feedback."""
    if target[1] is None:
        return {}
    return {"system_fingerprint": f"{target[0]}@v{result.adapter_version}", "sample_ids": list(result.sample_ids)}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    body = await read_json(request, wire.ChatIn)
    state = serve_state(request)
    target = _resolve(state, request, body.model)
    if not body.messages:
        raise ConfigError("messages: at least one message is needed")
    prompt = state.runtime.renderer.initial([{"role": m.role, "content": m.content or ""} for m in body.messages])
    return await _answer(state, request, body, target, prompt, chat=True)


@router.post("/completions")
async def completions(request: Request) -> Any:
    body = await read_json(request, wire.CompletionIn)
    state = serve_state(request)
    target = _resolve(state, request, body.model)
    if isinstance(body.prompt, str):
        prompt = list(state.runtime.tokenizer.encode(body.prompt, add_special_tokens=False))
    elif body.prompt and all(isinstance(t, int) for t in body.prompt):
        prompt = list(body.prompt)
    else:
        raise UnsupportedError("a list of several prompts is not supported by clora serve (send one per request)")
    if not prompt:
        raise ConfigError("prompt: no tokens")
    return await _answer(state, request, body, target, prompt, chat=False)


async def _answer(state: ServeState, request: Request, body: wire._Common, target: Target, prompt: list[int],
                  *, chat: bool) -> Any:
    spec = _spec(body, len(prompt), state.runtime.config.model.max_model_len)
    rid = state.new_id("chatcmpl" if chat else "cmpl")
    if not body.stream:
        result = await _sample(state, request, target, prompt, spec)
        texts = [(c.text, c.finish_reason) for c in result.completions]
        done = sum(len(c.token_ids) for c in result.completions)
        make = wire.chat_response if chat else wire.completion_response
        return JSONResponse({**make(rid, body.model, texts, len(prompt), done), **_extra(target, result)})
    # errors before the first byte are one JSON answer; the stream starts once the sampler answered
    result = await _sample(state, request, target, prompt, spec)
    return StreamingResponse(_stream(state, result, rid, body.model, chat, _extra(target, result)),
                             media_type="text/event-stream")


async def _stream(state: ServeState, result: SampleResult, rid: str, model: str, chat: bool,
                  extra: dict[str, Any]) -> AsyncIterator[bytes]:
    tokenizer = state.runtime.tokenizer
    try:
        for index, completion in enumerate(result.completions):
            shown = ""
            for n in range(1, len(completion.token_ids) + 1):
                text = tokenizer.decode(completion.token_ids[:n], skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    piece, shown = text[len(shown):], text
                    yield _sse(wire.chunk(rid, model, index, chat=chat, text=piece, reason=None, first=n == 1), extra)
            if completion.text and completion.text != shown and completion.text.startswith(shown):
                yield _sse(wire.chunk(rid, model, index, chat=chat, text=completion.text[len(shown):], reason=None),
                           extra)
            yield _sse(wire.chunk(rid, model, index, chat=chat, text=None, reason=completion.finish_reason), extra)
        yield b"data: [DONE]\n\n"
    except Exception as error:  # noqa: BLE001 - a stream that broke says so in the stream
        yield _sse(error_body(error))


def _sse(payload: dict[str, Any], extra: dict[str, Any] | None = None) -> bytes:
    return f"data: {json.dumps({**payload, **(extra or {})})}\n\n".encode()
