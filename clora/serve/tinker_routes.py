"""The Tinker REST API (``/api/v1/...``) over the runtime's in-process primitives: the service
routes, training and futures (sampling is in ``tinker_sampling``, request bodies in ``tinker_requests``).

A training client (``create_model``) is a clora tenant driven through its ``TenantHandle``;
``forward_backward`` / ``optim_step`` / ``save_*`` / ``load_weights`` / ``create_model`` answer
with a future id at once and run in the background, in arrival order per model; ``retrieve_future``
waits a little for the result and answers ``try_again`` while it is not there.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from clora import events
from clora.config import LoraConfig, OptimConfig, validate_tenant_name
from clora.errors import ConfigError, NotFoundError, UnsupportedError
from clora.serve import tinker_wire as wire
from clora.serve.bodies import read_json, serve_state
from clora.serve.continual_routes import continual_policy
from clora.serve.errors import error_message, status_of
from clora.serve.state import SamplingTarget, ServeState
from clora.serve.tinker_requests import CreateModelIn, FutureIn, LoadIn, LoraIn, ModelIn, OptimStepIn, SaveIn, SessionIn
from clora.tenant.handle import TenantHandle

__all__ = ["router", "submit", "PROTO", "TINKER_PREFIX"]

router = APIRouter(prefix="/api/v1")
PROTO = "application/x-protobuf"
RETRIEVE_WAIT_S = 20.0  # a retrieve_future waits this long for its result before answering try_again
TINKER_PREFIX = "tinker://"


async def _model_request(request: Request, type_: type) -> tuple[Any, ServeState, TenantHandle]:
    """A request about one training client (``model_id``): its body, the state, and the tenant, if this
    request's key may use it (403 / 404 otherwise)."""
    body = await read_json(request, type_)
    state = serve_state(request)
    return body, state, state.tenant(request.state.principal, body.model_id)


# ----------------------------------------------------------------------------- service

@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request) -> dict[str, Any]:
    state = serve_state(request)
    return {"supported_models": [{"model_name": state.base_model, "trainable": True, "sampleable": True,
                                  "max_context_length": state.runtime.config.model.max_model_len}]}


@router.post("/client/config")
async def client_config(request: Request) -> dict[str, Any]:
    # plain API keys, fwd/bwd chunks one after another (their order is the training order), httpx transport
    return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": False, "proto_compress_fwdbwd": False,
            "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False, "sample_join_sampling_session": False}


@router.post("/client/dynamic_config")
async def client_dynamic_config(request: Request) -> dict[str, Any]:
    return {"sample_cancel_enabled": False}


@router.post("/create_session")
async def create_session(request: Request) -> dict[str, Any]:
    state = serve_state(request)
    session_id = state.new_id("session")
    state.sessions[session_id] = request.state.principal.name
    return {"type": "create_session", "session_id": session_id}


def _session(request: Request, session_id: str) -> None:
    """404 unless the session exists and belongs to this request's key (or the key is an admin)."""
    principal = request.state.principal
    if serve_state(request).sessions.get(session_id) != principal.name and not principal.admin:
        raise NotFoundError(f"unknown session {session_id!r}")


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> dict[str, Any]:
    _session(request, (await read_json(request, SessionIn)).session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request) -> dict[str, Any]:
    # the SDK's ServiceClient.close() (a `with` block's end); the session's tenants keep serving
    _session(request, session_id)
    serve_state(request).sessions.pop(session_id, None)
    return {"type": "finish_session"}


@router.post("/telemetry")
async def telemetry(request: Request) -> dict[str, Any]:
    return {"status": "accepted"}


# ----------------------------------------------------------------------------- training

def submit(request: Request, chain: str | None, work: Any) -> dict[str, Any]:
    """Run ``work`` in the background after ``chain``'s earlier work; the answer names its future."""
    state = serve_state(request)
    kind = request.url.path.rsplit("/", 1)[-1]  # the route: what the future does, for the shutdown events
    request_id = state.futures.submit(request.state.principal.name, chain, work, kind=kind)
    return {"request_id": request_id, "model_id": chain}


@router.post("/create_model")
async def create_model(request: Request) -> dict[str, Any]:
    body = await read_json(request, CreateModelIn)
    state, principal = serve_state(request), request.state.principal
    if body.base_model != state.base_model:
        raise NotFoundError(f"unknown base model {body.base_model!r} (this server trains {state.base_model!r})")
    if body.optimizer_config and body.optimizer_config.get("type", "adamw") != "adamw":
        raise UnsupportedError(f"optimizer {body.optimizer_config.get('type')!r} is not supported by clora serve "
                               "(only adamw)")
    lora_in = body.lora_config or LoraIn()
    if not (lora_in.train_mlp and lora_in.train_attn):
        raise UnsupportedError("lora_config train_mlp=False / train_attn=False is not supported by clora serve")
    name = str((body.user_metadata or {}).get("clora_tenant") or state.new_id("tinker"))
    validate_tenant_name(name)
    if not state.may_use(principal, name) and not (principal.admin or name.startswith("tinker-")):
        state.keys.check(principal, name)
    lora = LoraConfig(rank=lora_in.rank, init_seed=lora_in.seed or 0)
    continual = continual_policy((body.user_metadata or {}).get("clora_continual"))
    state.owners.setdefault(name, principal.name)  # claimed now: a second create of the name fails below

    async def work() -> dict[str, Any]:
        try:
            handle = await state.runtime.tenant(name, lora=lora, optim=OptimConfig(), continual=continual)
        except BaseException:
            if name not in state.tenants and state.owners.get(name) == principal.name:
                state.owners.pop(name, None)
            raise
        state.tenants[name] = handle
        state.loras[name] = lora
        state.runtime.log.info(events.SERVE_TENANT_CREATED, tenant=name, rank=lora.rank, key=principal.name)
        return {"type": "create_model", "model_id": name}

    return submit(request, name, work)


@router.post("/get_info")
async def get_info(request: Request) -> dict[str, Any]:
    body, state, _ = await _model_request(request, ModelIn)
    return {"type": "get_info", "model_id": body.model_id, "is_lora": True,
            "model_data": {"arch": "llama", "model_name": state.base_model, "tokenizer_id": None}}


@router.post("/forward_backward")
async def forward_backward(request: Request) -> dict[str, Any]:
    if PROTO not in request.headers.get("content-type", ""):
        raise UnsupportedError("forward_backward as JSON is not supported by clora serve (send protobuf, as the "
                               "tinker SDK does)")
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise UnsupportedError(f"Content-Encoding {request.headers['content-encoding']!r} is not supported by "
                               "clora serve")
    model_id, loss_fn, config, raw, forward_only = wire.decode_forward_backward(await request.body())
    state = serve_state(request)
    handle = state.tenant(request.state.principal, model_id)
    loss = wire.loss_config(loss_fn, dict(config), len(raw))
    data, signal = wire.trainable([wire.to_datum(i, entry, loss.kind) for i, entry in enumerate(raw)], loss.kind)

    async def work() -> bytes:
        logprobs = await handle.logprobs(data)  # the policy before this call's gradient: Tinker's outputs
        metrics: dict[str, float] = {}
        if not forward_only:
            result = await handle.forward_backward(data, loss)
            metrics = wire.metrics(result.values, has_signal=signal)
        return wire.encode_forward_backward_output([row[1:] for row in logprobs], metrics)

    return submit(request, model_id, work)


@router.post("/forward")
async def forward(request: Request) -> dict[str, Any]:
    raise UnsupportedError("forward (JSON) is not supported by clora serve; use forward_backward")


@router.post("/optim_step")
async def optim_step(request: Request) -> dict[str, Any]:
    body, state, handle = await _model_request(request, OptimStepIn)
    if body.optimizer_params is not None or body.adam_params is None:
        raise UnsupportedError("optimizer_params other than AdamParams are not supported by clora serve")
    adam = body.adam_params
    optim = OptimConfig(lr=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps,
                        weight_decay=adam.weight_decay, grad_clip=adam.grad_clip_norm)

    async def work() -> dict[str, Any]:
        result = await handle.optim_step(optim)
        return {"type": "optim_step",
                "metrics": {k: v for k, v in result.values.items() if not k.startswith("time/")}}

    return submit(request, body.model_id, work)


def _weights_path(model_id: str, kind: str, name: str | None, state: ServeState) -> str:
    label = name or state.new_id("v")
    validate_tenant_name(label)
    return f"{TINKER_PREFIX}{model_id}/{kind}/{label}"


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
    body, state, handle = await _model_request(request, SaveIn)
    path = _weights_path(body.model_id, "sampler_weights", body.path, state) if body.path else None

    async def work() -> dict[str, Any]:
        await handle.publish()  # the trainer's newest version now serves in the engine
        out: dict[str, Any] = {"type": "save_weights_for_sampler", "path": path}
        if body.sampling_session_seq_id is not None:
            session = state.new_id("sampling")
            state.sampling[session] = SamplingTarget(handle.name)
            out["sampling_session_id"] = session
        return out

    return submit(request, body.model_id, work)


@router.post("/save_weights")
async def save_weights(request: Request) -> dict[str, Any]:
    body, state, handle = await _model_request(request, SaveIn)
    path = _weights_path(body.model_id, "weights", body.path, state)
    folder = state.runtime.run_dir / "serve" / "weights" / body.model_id / path.rsplit("/", 1)[1]

    async def work() -> dict[str, Any]:
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)
        await handle.save(folder)
        state.checkpoints[path] = (str(folder), handle.name)
        return {"type": "save_weights", "path": path}

    return submit(request, body.model_id, work)


@router.post("/load_weights")
async def load_weights(request: Request) -> dict[str, Any]:
    body = await read_json(request, LoadIn)
    state, principal = serve_state(request), request.state.principal
    if body.optimizer:
        raise UnsupportedError("loading optimizer state (load_state_with_optimizer, "
                               "create_training_client_from_state_with_optimizer) is not supported by clora serve "
                               "(the adapter loads; the optimizer starts fresh)")
    handle = state.tenant(principal, body.model_id) if body.model_id is not None else None
    saved = state.checkpoints.get(body.path)
    if saved is None or not state.may_use(principal, saved[1]):  # another key's checkpoint: not found either
        raise NotFoundError(f"unknown checkpoint {body.path!r}")
    folder, source = saved
    if handle is None:  # create_training_client_from_state: a new tenant with the checkpoint's shape
        return _create_from_checkpoint(request, body, folder, source)

    async def work() -> dict[str, Any]:
        await handle.load(folder)
        return {"type": "load_weights", "path": body.path, "model_id": body.model_id}

    return submit(request, body.model_id, work)


def _create_from_checkpoint(request: Request, body: LoadIn, folder: str, source: str) -> dict[str, Any]:
    state, principal = serve_state(request), request.state.principal
    if body.session_id is None or body.model_seq_id is None:
        raise ConfigError("load_weights: give model_id, or session_id and model_seq_id for a new training client")
    model_id = f"{body.session_id}:train:{body.model_seq_id}"  # the id the SDK derives for the new client
    name = str((body.user_metadata or {}).get("clora_tenant") or state.new_id("tinker"))
    validate_tenant_name(name)
    if not (principal.admin or name.startswith("tinker-")):
        state.keys.check(principal, name)
    lora = state.loras.get(source, LoraConfig())
    state.owners.setdefault(name, principal.name)

    async def work() -> dict[str, Any]:
        handle = await state.runtime.tenant(name, lora=lora, optim=OptimConfig())
        state.tenants[name], state.loras[name], state.aliases[model_id] = handle, lora, name
        await handle.load(folder)
        return {"type": "load_weights", "path": body.path, "model_id": model_id}

    return submit(request, model_id, work)


@router.post("/unload_model")
async def unload_model(request: Request) -> dict[str, Any]:
    body, state, handle = await _model_request(request, ModelIn)

    async def work() -> dict[str, Any]:
        await handle.close()
        state.tenants.pop(handle.name, None)
        state.owners.pop(handle.name, None)
        return {"type": "unload_model", "model_id": handle.name}

    return submit(request, body.model_id, work)


# ----------------------------------------------------------------------------- futures

@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    body = await read_json(request, FutureIn)
    state, principal = serve_state(request), request.state.principal
    task = await state.futures.wait(body.request_id, principal.name, principal.admin, RETRIEVE_WAIT_S)
    if task is None:
        return JSONResponse({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
    if task.cancelled():
        return JSONResponse({"error": "the request was cancelled (the server is shutting down)",
                             "category": "server"})
    error = task.exception()
    if error is not None:
        status = status_of(error)
        if status >= 500:  # a bug or a dead engine: the traceback goes to the events, not to the client
            state.runtime.log.error(events.SERVE_REQUEST_FAILED, path=request.url.path, status=status,
                                    error=repr(error), exc_info=error)
        category = "user" if 400 <= status < 500 else "server"
        return JSONResponse({"error": error_message(error), "category": category})
    result = task.result()
    if isinstance(result, bytes):
        return Response(result, media_type=PROTO)
    return JSONResponse(result)
