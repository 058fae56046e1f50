"""Every message between clora's actors, in one place.

Messages are msgspec tagged Structs, grouped into one union per inbox; each actor declares its union as
its ``inbox`` (the actor kernel checks at class creation that its handlers cover exactly that union;
TenantActor's one message, RunExperiment, lives next to it). They carry plain
data (token ids, floats, paths): no live tensors cross an actor boundary, except the
trainer-local hand-offs ``AdapterSnapshot`` (SyncActor turns it into a file at once) and
``StoreState`` (a tenant writes it as a checkpoint, or restores one through the trainer).

Token-aligned lists in ``Datum`` follow one convention: index ``i`` describes the
prediction of ``tokens[i]`` from ``tokens[:i]``; index 0 is never trained.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from clora.config import MAX_TEMPERATURE, LoraConfig, LossConfig, OptimConfig
from clora.errors import field_error

__all__ = [
    "SamplingSpec",
    "Completion",
    "SampleRequest",
    "SampleResult",
    "RegisterAdapter",
    "LoadAdapter",
    "RemoveAdapter",
    "AdapterLoaded",
    "GetEngineStats",
    "SamplerMsg",
    "Datum",
    "AddTenant",
    "RemoveTenant",
    "ForwardBackward",
    "OptimStep",
    "TrainStep",
    "ComputeLogprobs",
    "ExportAdapter",
    "ImportAdapter",
    "Snapshot",
    "AdapterSnapshot",
    "ExportStoreState",
    "ImportStoreState",
    "StoreState",
    "StepMetrics",
    "TrainStepResult",
    "TrainerMsg",
    "Publish",
    "Published",
    "SyncMsg",
]


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


# ----------------------------------------------------------------------------- sampler


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What vLLM's SamplingParams needs; logprobs of the sampled tokens are always returned.

    Checked on creation (also when decoded or replaced): a bad value is one ``ConfigError`` naming
    ``sampling.<field>``, before any request reaches the engine. ``seed`` makes the request's sampling
    reproducible as far as the engine allows (docs/reliability.md#seeds)."""

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # generation also ends at these tokens (kept in the output)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise field_error("sampling.n", f"must be >= 1 (completions per prompt), got {self.n}")
        if self.max_tokens < 1:
            raise field_error("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature <= MAX_TEMPERATURE):  # nan fails too
            raise field_error("sampling.temperature",
                              f"must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise field_error("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise field_error("sampling.seed", f"must be in [0, 2**63) or None, got {self.seed}")
        if any(not stop for stop in self.stop):
            raise field_error("sampling.stop", "a stop string must not be empty")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise field_error("sampling.stop_token_ids", f"must be token ids >= 0, got {list(self.stop_token_ids)}")


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    token_ids: list[int]
    logprobs: list[float]  # sampler log-prob of each token in token_ids
    text: str
    finish_reason: str | None


class SampleRequest(_Msg):
    """Sample ``sampling.n`` completions of one prompt. ``tenant=None`` is the base model."""

    tenant: str | None
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()


class SampleResult(_Msg):
    tenant: str | None
    adapter_version: int  # the version that produced every token below (-1 for the base model)
    prompt_token_ids: list[int]
    completions: list[Completion]
    sample_ids: list[str] = []  # one per completion, for feedback (continual tenants only; docs/continual.md)


class RegisterAdapter(_Msg):
    """Make a tenant's adapter (PEFT directory) servable as ``version``."""

    tenant: str
    path: str
    version: int = 0


class LoadAdapter(_Msg):
    """Serve ``version`` from ``path`` for a registered tenant.

    ``keep_serving=False``: replace the weights in place under the tenant's LoRA id; the tenant's
    new requests wait while its in-flight ones finish (the gate). ``True``: load the version under a
    new LoRA id beside the old one, which finishes its in-flight requests and is unloaded when the
    last one ends; nobody waits (off-policy tenants, docs/async.md)."""

    tenant: str
    path: str
    version: int
    keep_serving: bool = False


class RemoveAdapter(_Msg):
    tenant: str


class AdapterLoaded(_Msg):
    tenant: str
    version: int
    duration_s: float


class GetEngineStats(_Msg):
    """Ask for the engine's counters since the sampler started (``clora.sampler.engine_stats.EngineStatsSnapshot``:
    prompt tokens computed / cached, decode batch sizes, ...), or None when its engine keeps none."""


SamplerMsg = Union[SampleRequest, RegisterAdapter, LoadAdapter, RemoveAdapter, GetEngineStats]


# ----------------------------------------------------------------------------- trainer


class Datum(msgspec.Struct, frozen=True, kw_only=True):
    """One training sequence with token-aligned lists (see the module docstring)."""

    tokens: list[int]
    loss_mask: list[float]  # 1.0 where tokens[i] is a policy token to train, 0.0 for prompt/tool tokens
    advantages: list[float]  # per token; usually the sequence's advantage on every masked-in token
    sampler_logprobs: list[float]  # log-prob of tokens[i] under the sampling policy (0.0 where masked out)
    sampler_version: int | None = None  # the oldest adapter version that sampled any of its tokens; None: untagged


class StepMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """What the trainer measured; ``values`` uses slash keys like 'loss', 'grad_norm', 'time/fwd_bwd'."""

    tenant: str
    version: int
    values: dict[str, float]


class AddTenant(_Msg):
    tenant: str
    lora: LoraConfig
    optim: OptimConfig
    init_from: str | None = None  # a PEFT adapter directory to start from (checked against lora)


class RemoveTenant(_Msg):
    tenant: str


class ForwardBackward(_Msg):
    """Accumulate gradients of ``loss`` over ``data`` into the tenant's grad buffer."""

    tenant: str
    data: list[Datum]
    loss: LossConfig = LossConfig()


class OptimStep(_Msg):
    """Apply the accumulated gradients with the tenant's optimizer; the version goes up by one.
    ``optim``: this step's hyperparameters instead of the tenant's (Tinker's per-step AdamParams);
    the Adam moments and step count stay the tenant's."""

    tenant: str
    optim: OptimConfig | None = None


class TrainStep(_Msg):
    """ForwardBackward then OptimStep as one atomic step.

    ``copy_adapter`` / ``copy_state``: also reply with the new version's AdapterSnapshot (to
    publish) / StoreState (to checkpoint), copied before the device is given to anyone else, so
    neither needs a second wait behind other tenants' steps.

    ``max_staleness`` = k bounds off-policy data exactly (clora.trainer.staleness): when the step
    runs on the tenant's version u, a datum sampled with version v trains only if u - v <= k
    (every datum must then carry its ``sampler_version``). Data past the bound are dropped
    (``stale_policy="drop"``: the rest trains; all dropped -> StaleDataError) or the whole step is
    rejected with StaleDataError so the asker samples again (``"resample"``). None: no bound.
    """

    tenant: str
    data: list[Datum]
    loss: LossConfig = LossConfig()
    copy_adapter: bool = False
    copy_state: bool = False
    max_staleness: int | None = None
    stale_policy: Literal["drop", "resample"] = "drop"


class ComputeLogprobs(_Msg):
    """Trainer-policy log-probs of every token of each datum (index 0 is 0.0)."""

    tenant: str
    data: list[Datum]


class ExportAdapter(_Msg):
    """Write the tenant's current adapter as a PEFT directory."""

    tenant: str
    out_dir: str


class ImportAdapter(_Msg):
    """Replace the tenant's adapter weights with a PEFT directory (optimizer state is reset)."""

    tenant: str
    path: str


class Snapshot(_Msg):
    """Ask for the tenant's current adapter weights (trainer-local hand-off)."""

    tenant: str


class AdapterSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """PEFT state dict (name -> CPU tensor copy) and adapter_config of one version. Local only."""

    tenant: str
    version: int
    tensors: dict[str, Any]  # torch.Tensor values
    peft_config: dict[str, Any]


class ExportStoreState(_Msg):
    """Ask for the tenant's whole AdapterStore (weights, Adam moments, gradient, counters) for a checkpoint."""

    tenant: str


class StoreState(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's whole AdapterStore as CPU fp32 tensor copies (store names). Trainer-local hand-off."""

    tenant: str
    lora: LoraConfig
    optim: OptimConfig
    version: int
    adam_step: int
    grad_weight: float
    grad_normalize: str | None
    params: dict[str, Any]  # torch.Tensor values, like the three below
    exp_avg: dict[str, Any]
    exp_avg_sq: dict[str, Any]
    grads: dict[str, Any]


class TrainStepResult(msgspec.Struct, frozen=True, kw_only=True):
    """A TrainStep's reply: its metrics, and the copies of the new version it asked for
    (``copy_adapter`` -> ``adapter``, ``copy_state`` -> ``state``), taken in the same device job."""

    metrics: StepMetrics
    adapter: AdapterSnapshot | None = None
    state: StoreState | None = None
    staleness: dict[int, int] = {}  # u - v -> trained data (data with a sampler_version only)
    dropped: int = 0  # data past the staleness bound, not trained


class ImportStoreState(_Msg):
    """Replace the tenant's whole store with a StoreState (a checkpoint); its version becomes state.version."""

    tenant: str
    state: StoreState  # trainer-local: holds tensors


TrainerMsg = Union[
    AddTenant, RemoveTenant, ForwardBackward, OptimStep, TrainStep, ComputeLogprobs, ExportAdapter, ImportAdapter,
    Snapshot, ExportStoreState, ImportStoreState,
]


# ----------------------------------------------------------------------------- sync


class Publish(_Msg):
    """Publish the tenant's current trainer weights into the engine, or ``adapter`` when given (an
    AdapterSnapshot a TrainStep replied with: no second trip to the trainer)."""

    tenant: str
    adapter: AdapterSnapshot | None = None  # None: ask the trainer for a snapshot
    keep_serving: bool = False  # LoadAdapter.keep_serving: the old version finishes its requests beside the new one


class Published(_Msg):
    tenant: str
    version: int
    duration_s: float


SyncMsg = Union[Publish, RemoveAdapter]
