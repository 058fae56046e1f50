"""The Tinker REST API's sampling: sampling sessions (a tenant's serving version, or the base model)
and ``asample`` (``sample`` and ``compute_logprobs``), answered through futures like training."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from clora.errors import ConfigError, NotFoundError, UnsupportedError
from clora.messages import Datum, SampleRequest, SamplingSpec
from clora.serve import tinker_wire as wire
from clora.serve.bodies import read_json, serve_state
from clora.serve.state import SamplingTarget, ServeState
from clora.serve.tinker_requests import SampleIn, SamplingSessionIn
from clora.serve.tinker_routes import TINKER_PREFIX, submit

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> dict[str, Any]:
    body = await read_json(request, SamplingSessionIn)
    state = serve_state(request)
    target = _target(state, request, body.model_path, body.base_model)
    session = state.new_id("sampling")
    state.sampling[session] = target
    return {"type": "create_sampling_session", "sampling_session_id": session}


def _target(state: ServeState, request: Request, model_path: str | None, base_model: str | None) -> SamplingTarget:
    if model_path:
        if not model_path.startswith(TINKER_PREFIX):
            raise NotFoundError(f"unknown model_path {model_path!r} (expected tinker://<model>/sampler_weights/...)")
        tenant = model_path[len(TINKER_PREFIX):].split("/", 1)[0]
        state.tenant(request.state.principal, tenant)
        return SamplingTarget(tenant)
    if base_model is not None and base_model != state.base_model:
        raise NotFoundError(f"unknown base model {base_model!r} (this server serves {state.base_model!r})")
    return SamplingTarget(None)


@router.post("/asample")
async def asample(request: Request) -> dict[str, Any]:
    body = await read_json(request, SampleIn)
    state = serve_state(request)
    if body.sampling_session_id is not None:
        target = state.sampling.get(body.sampling_session_id)
        if target is None:
            raise NotFoundError(f"unknown sampling session {body.sampling_session_id!r}")
        if target.tenant is not None:
            state.tenant(request.state.principal, target.tenant)
    else:
        target = _target(state, request, body.model_path, body.base_model)
    if body.topk_prompt_logprobs or body.topk_sample_logprobs:
        raise UnsupportedError("top-k logprobs are not supported by clora serve")
    params = body.sampling_params
    if params.top_k != -1:
        raise UnsupportedError("sampling_params.top_k is not supported by clora serve")
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
    strings = tuple(s for s in stop if isinstance(s, str))
    token_ids = tuple(s for s in stop if not isinstance(s, str))  # the renderers' stop tokens (e.g. <|im_end|>)
    if strings and token_ids:
        raise ConfigError("sampling_params.stop: give stop strings or stop token ids, not both")
    prompt: list[int] = []
    for chunk in body.prompt.chunks:
        if chunk.type != "encoded_text":
            raise UnsupportedError(f"{chunk.type} prompt chunks are not supported by clora serve")
        prompt.extend(chunk.tokens)
    if not prompt:
        raise ConfigError("prompt: no tokens")
    spec = SamplingSpec(n=body.num_samples, max_tokens=params.max_tokens or 16, temperature=params.temperature,
                        top_p=params.top_p, seed=params.seed, stop=strings, stop_token_ids=token_ids)
    if body.prompt_logprobs and target.tenant is None:
        raise UnsupportedError("prompt_logprobs (compute_logprobs) of the base model is not supported by clora serve")

    async def work() -> bytes:
        result = await state.runtime.ask(SampleRequest(tenant=target.tenant, prompt_token_ids=prompt, sampling=spec))
        prompt_logprobs = None
        if body.prompt_logprobs:
            handle = state.tenants[target.tenant]
            datum = Datum(tokens=prompt, loss_mask=[0.0] * len(prompt), advantages=[0.0] * len(prompt),
                          sampler_logprobs=[0.0] * len(prompt))
            (row,) = await handle.logprobs([datum])
            prompt_logprobs = [float("nan")] + row[1:]
        return wire.encode_sample_response(result.completions, prompt_logprobs)

    answer = submit(request, None, work)
    answer["sample_sequence_ids"] = [f"{answer['request_id']}-{i}" for i in range(body.num_samples)]
    return answer
