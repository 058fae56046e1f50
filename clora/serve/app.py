"""The HTTP application: body limit, API keys, one JSON error per refused request, readiness, and
the Tinker and OpenAI routers over one ``ServeState``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clora import events
from clora.errors import PayloadTooLargeError
from clora.serve.auth import request_secret
from clora.serve.defaults import DEFAULT_MAX_BODY_BYTES
from clora.serve.errors import error_body, status_of
from clora.serve.state import ServeState

__all__ = ["create_app"]

PUBLIC = frozenset({"/healthz", "/readyz", "/api/v1/healthz"})  # answered without a key


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 before any route reads it (a declared
    Content-Length is checked at once; a streamed body is counted as it arrives)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLargeError(f"request body over the server's limit of {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        error = PayloadTooLargeError(f"request body over the server's limit of {self.limit} bytes")
        await JSONResponse(error_body(error), status_code=413)(scope, receive, send)


def create_app(state: ServeState, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    from clora.serve.continual_routes import router as continual_router
    from clora.serve.openai_routes import router as openai_router
    from clora.serve.tinker_routes import router as tinker_router
    from clora.serve.tinker_sampling import router as tinker_sampling_router

    app = FastAPI(title="clora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    log = state.runtime.log

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        state.requests += 1
        try:
            if request.url.path not in PUBLIC:
                host = request.client.host if request.client else None
                request.state.principal = state.keys.authenticate(request_secret(request.headers), host)
            return await call_next(request)
        except Exception as error:  # noqa: BLE001 - every error becomes one JSON answer
            return _answer(request, error)

    def _answer(request: Request, error: BaseException) -> JSONResponse:
        status = status_of(error)
        state.errors += 1
        body = error_body(error)
        if status >= 500:  # a bug or a dead engine: the traceback goes to the events, not to the client
            log.error(events.SERVE_REQUEST_FAILED, path=request.url.path, status=status, error=repr(error),
                      exc_info=error)
        else:
            log.info(events.SERVE_REQUEST_FAILED, path=request.url.path, status=status,
                     error=body["error"]["message"])
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "base_model": state.base_model, "tenants": len(state.tenants)})

    app.include_router(tinker_router)
    app.include_router(tinker_sampling_router)
    app.include_router(openai_router)
    app.include_router(continual_router)
    outer = BodyLimit(app, max_body_bytes)
    outer.state = app.state  # type: ignore[attr-defined]
    return outer  # type: ignore[return-value]

