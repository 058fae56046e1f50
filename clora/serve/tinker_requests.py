"""The JSON bodies of the Tinker REST API's requests, as the SDK sends them (unknown fields are ignored:
the SDK adds fields over time). Protobuf payloads (``forward_backward``) are in ``tinker_wire``."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "AdamIn", "ChunkIn", "CreateModelIn", "FutureIn", "LoadIn", "LoraIn", "ModelIn", "OptimStepIn", "PromptIn",
    "SampleIn", "SamplingParamsIn", "SamplingSessionIn", "SaveIn", "SessionIn",
]


class _Req(msgspec.Struct, kw_only=True):  # unknown fields are ignored: the SDK adds fields over time
    pass


class LoraIn(_Req, kw_only=True):
    rank: int = 8
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelIn(_Req, kw_only=True):
    session_id: str
    base_model: str
    model_seq_id: int = 0
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraIn | None = None
    optimizer_config: dict[str, Any] | None = None


class AdamIn(_Req, kw_only=True):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    type: str | None = None


class OptimStepIn(_Req, kw_only=True):
    model_id: str
    adam_params: AdamIn | None = None
    optimizer_params: dict[str, Any] | None = None
    seq_id: int | None = None


class ModelIn(_Req, kw_only=True):
    model_id: str


class SaveIn(_Req, kw_only=True):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None


class LoadIn(_Req, kw_only=True):
    path: str
    model_id: str | None = None
    optimizer: bool = False
    session_id: str | None = None  # with model_seq_id: a new training client made from the checkpoint
    model_seq_id: int | None = None
    user_metadata: dict[str, Any] | None = None


class SessionIn(_Req, kw_only=True):
    session_id: str


class SamplingSessionIn(_Req, kw_only=True):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class FutureIn(_Req, kw_only=True):
    request_id: str


class ChunkIn(_Req, kw_only=True):
    tokens: list[int] = []
    type: str = "encoded_text"


class PromptIn(_Req, kw_only=True):
    chunks: list[ChunkIn]


class SamplingParamsIn(_Req, kw_only=True):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class SampleIn(_Req, kw_only=True):
    prompt: PromptIn
    sampling_params: SamplingParamsIn
    num_samples: int = 1
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
