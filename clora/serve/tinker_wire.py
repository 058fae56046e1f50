"""The Tinker wire format, decoded into clora's messages and encoded back.

The official ``tinker`` SDK (its installed source is the ground truth) sends forward_backward as a
protobuf ``ForwardBackwardRequest`` and reads ``ForwardBackwardOutput`` / ``SampleResponse`` only as
protobuf; everything else is JSON. The protobuf descriptors come from the SDK's own generated module
(``tinker.proto.tinker_public_pb2``), imported here only.

Tinker's datum is next-token shaped: ``model_input`` = tokens[:-1], ``target_tokens`` = tokens[1:],
per-target ``weights`` / ``advantages`` / ``logprobs``. A clora ``Datum`` is token-aligned: its
tokens are the input plus the last target, and target i's values sit at position i + 1.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from clora.config import LossConfig
from clora.errors import ConfigError, UnsupportedError
from clora.messages import Completion, Datum

__all__ = ["decode_forward_backward", "encode_forward_backward_output", "encode_sample_response",
           "loss_config", "metrics", "to_datum", "trainable", "LOSSES"]

# Tinker loss name -> clora LossConfig.kind; other names answer UnsupportedError naming them.
LOSSES = {"cross_entropy": "cross_entropy", "importance_sampling": "importance_sampling", "ppo": "ppo",
          "cispo": "cispo"}


def _pb() -> Any:
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _tensor(msg: Any) -> np.ndarray:
    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    if msg.dtype not in dtypes:
        raise ConfigError(f"loss_fn_inputs: tensor dtype {msg.dtype} is not float32, int64 or int32")
    if msg.HasField("sparse_csr"):
        raise UnsupportedError("loss_fn_inputs: sparse (CSR) tensors are not supported by clora serve")
    return np.frombuffer(msg.dense, dtype=dtypes[msg.dtype]).copy()


def decode_forward_backward(body: bytes) -> tuple[str, str, dict[str, float], list[dict[str, Any]], bool]:
    """(model_id, loss_fn, loss_fn_config, data, forward_only) of a protobuf ForwardBackwardRequest;
    each datum is ``{"input": [...], "<loss input>": np.ndarray, ...}``."""
    from google.protobuf.message import DecodeError

    msg = _pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise ConfigError(f"forward_backward: the body is not a ForwardBackwardRequest protobuf ({e})") from None
    config: dict[str, float] = {}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise UnsupportedError(f"loss_fn_config: text value for {key!r} is not supported by clora serve")
        config[key] = value.number
    for key, value in msg.loss_fn_config.items():
        config.setdefault(key, value)
    data = []
    for index, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise UnsupportedError(f"datum {index}: {chunk.WhichOneof('chunk')} chunks (only token chunks are "
                                       "supported by clora serve)")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        entry: dict[str, Any] = {"input": tokens}
        for name, tensor in datum.loss_fn_inputs.items():
            entry[name] = _tensor(tensor)
        data.append(entry)
    return msg.model_id, msg.loss_fn, config, data, msg.forward_only


def loss_config(loss_fn: str, config: dict[str, float], n_data: int) -> LossConfig:
    """Tinker's losses are sums over the call's tokens; clora's "constant" normalisation divides the
    sum by sequences * constant, so constant = 1 / sequences gives Tinker's sum."""
    if loss_fn not in LOSSES:
        raise UnsupportedError(f"loss_fn {loss_fn!r} is not supported by clora serve "
                               f"(supported: {', '.join(LOSSES)})")
    kind = LOSSES[loss_fn]
    clip = {}
    if "clip_low_threshold" in config:
        clip["clip_low"] = 1.0 - config.pop("clip_low_threshold")
    if "clip_high_threshold" in config:
        clip["clip_high"] = config.pop("clip_high_threshold") - 1.0
    if config:
        raise UnsupportedError(f"loss_fn_config key(s) {', '.join(sorted(config))} are not supported by clora serve")
    return LossConfig(kind=kind, normalize="constant", normalize_constant=1.0 / max(n_data, 1), **clip)


def _finite(name: str, index: int, values: np.ndarray) -> list[float]:
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"datum {index}: loss_fn_inputs {name!r} holds a NaN or infinite value")
    return values.astype(np.float64).tolist()


def to_datum(index: int, entry: dict[str, Any], kind: str) -> Datum:
    """A clora Datum of one decoded Tinker datum (see the module docstring for the alignment)."""
    inputs: list[int] = entry["input"]
    if "target_tokens" not in entry:
        raise ConfigError(f"datum {index}: loss_fn_inputs needs 'target_tokens'")
    targets = entry["target_tokens"].astype(np.int64).tolist()
    if len(targets) != len(inputs) or not inputs:
        raise ConfigError(f"datum {index}: target_tokens has {len(targets)} entries, model_input {len(inputs)} "
                          "(they must be equal and non-zero)")
    if targets[:-1] != inputs[1:]:
        raise UnsupportedError(f"datum {index}: target_tokens that are not model_input shifted by one token "
                               "are not supported by clora serve")
    n = len(targets)

    def field(name: str, default: float | None) -> list[float]:
        if name not in entry:
            if default is None:
                raise ConfigError(f"datum {index}: loss {kind!r} needs loss_fn_inputs {name!r}")
            return [default] * n
        values = _finite(name, index, entry[name])
        if len(values) != n:
            raise ConfigError(f"datum {index}: loss_fn_inputs {name!r} has {len(values)} entries, expected {n}")
        return values

    advantages = field("advantages", 0.0 if kind == "cross_entropy" else None)
    logprobs = field("logprobs", 0.0 if kind == "cross_entropy" else None)
    if "weights" in entry:
        weights = field("weights", None)
    elif kind == "cross_entropy":
        weights = [1.0] * n
    else:  # Tinker's RL losses sum over every target; a zero advantage adds nothing
        weights = [1.0 if a != 0.0 else 0.0 for a in advantages]
    if any(w < 0 for w in weights):
        raise ConfigError(f"datum {index}: loss_fn_inputs 'weights' must be >= 0")
    return Datum(tokens=inputs + [targets[-1]], loss_mask=[0.0] + weights, advantages=[0.0] + advantages,
                 sampler_logprobs=[0.0] + [lp if w else 0.0 for lp, w in zip(logprobs, weights)])


_SUMMED = frozenset({"loss", "tokens", "sequences", "tokens_computed", "tokens_lm_head"})
_SAMPLER_RELATIVE = frozenset({"kl_sampler", "ratio_mean", "clip_frac"})  # compare with the sampler's log-probs


def metrics(values: dict[str, float], *, has_signal: bool = True) -> dict[str, float]:
    """clora's step metrics named the Tinker way, ``name:reduction`` (the SDK folds chunks by it);
    Tinker's loss is a sum over the call, and so is clora's here (see ``loss_config``). Without signal
    (``trainable`` trained every target of an all-zero-advantage batch) the metrics that compare with the
    sampler's log-probs are left out: they would be computed over prompt targets the client sent 0 for."""
    out = {}
    for key, value in values.items():
        if key.startswith("time/") or ":" in key or (not has_signal and key in _SAMPLER_RELATIVE):
            continue
        reduction = "sum" if key in _SUMMED else "max" if key == "version" else "mean"
        out[f"{key}:{reduction}"] = value
    return out


def trainable(data: list[Datum], kind: str) -> tuple[list[Datum], bool]:
    """The call's data, with at least one trained token, and whether it had signal (a target with a non-zero
    weight; for RL losses, a non-zero advantage). An RL batch without signal (every sample of a group scored
    the same) trains every target instead: Tinker sums over all of them, the gradient is zero either way, and
    the trainer needs a token to differentiate. A cross-entropy batch whose weights are all zero is a
    ConfigError."""
    if any(w for d in data for w in d.loss_mask):
        return data, True
    if kind == "cross_entropy" or not data:
        raise ConfigError("forward_backward: no datum has a target with a non-zero weight")
    return [msgspec.structs.replace(d, loss_mask=[0.0] + [1.0] * (len(d.tokens) - 1)) for d in data], False


def encode_forward_backward_output(per_datum_logprobs: list[list[float]], metrics: dict[str, float]) -> bytes:
    """A protobuf ForwardBackwardOutput: per datum the target tokens' log-probs (``logprobs``)."""
    pb = _pb()
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    for key, value in metrics.items():
        if math.isfinite(value):
            out.metrics[key] = float(value)
    record = out.loss_fn_outputs.add()
    record.num_datums = len(per_datum_logprobs)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    arrays = [np.asarray(row, dtype=np.float32) for row in per_datum_logprobs]
    offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = offsets.tobytes()
    return out.SerializeToString()


def encode_sample_response(completions: list[Completion], prompt_logprobs: list[float] | None) -> bytes:
    """A protobuf SampleResponse; ``prompt_logprobs`` has NaN where nothing was computed (position 0)."""
    pb = _pb()
    out = pb.SampleResponse()
    for completion in completions:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_LENGTH if completion.finish_reason == "length" else pb.STOP_REASON_STOP
        seq.tokens = np.asarray(completion.token_ids, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(completion.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return out.SerializeToString()
