"""OpenAI request and response shapes (the subset clora serves), as msgspec Structs."""

from __future__ import annotations

import time
from typing import Any

import msgspec

__all__ = ["ChatIn", "CompletionIn", "MessageIn", "chat_response", "completion_response", "chunk", "usage"]


class _In(msgspec.Struct, kw_only=True):  # unknown fields are ignored (clients send many optional ones)
    pass


class MessageIn(_In, kw_only=True):
    role: str
    content: str | None = None


class _Common(_In, kw_only=True):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: Any = None
    tools: Any = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatIn(_Common, kw_only=True):
    messages: list[MessageIn]


class CompletionIn(_Common, kw_only=True):
    prompt: str | list[int | str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def chat_response(rid: str, model: str, texts: list[tuple[str, str | None]], prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(reason), "logprobs": None}
                        for i, (text, reason) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, model: str, texts: list[tuple[str, str | None]], prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": _finish(reason), "logprobs": None}
                        for i, (text, reason) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, model: str, index: int, *, chat: bool, text: str | None, reason: str | None,
          first: bool = False) -> dict[str, Any]:
    """One streamed piece: ``text`` (None on the closing piece, which carries the finish reason)."""
    if chat:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": None if text is not None else _finish(reason),
                  "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": None if text is not None else _finish(reason),
                  "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
