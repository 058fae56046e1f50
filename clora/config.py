"""Configuration: frozen msgspec Structs that reject unknown fields, validated on creation.

Every value has a default that works on a 2-core CPU. ``load_toml`` / ``dump_toml`` read and
write the same Structs; a bad value raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import msgspec

from clora.errors import describe_validation_error, field_error
from clora.errors import ConfigError

__all__ = [
    "ModelConfig",
    "EngineConfig",
    "LoraConfig",
    "OptimConfig",
    "LossConfig",
    "TrainerConfig",
    "SchedulerConfig",
    "PlacementConfig",
    "ClusterConfig",
    "EnvConfig",
    "ExperimentConfig",
    "RuntimeConfig",
    "DEFAULT_TARGET_MODULES",
    "VLLM_LORA_RANKS",
    "ExampleStyle",
    "MAX_TEMPERATURE",
    "check_fits_model",
    "validate_tenant_name",
    "parse_cpu_list",
    "load_toml",
    "dump_toml",
    "decode_config",
]

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)

CPU_LORAS_HEADROOM = 8  # tenant adapters vLLM's CPU cache holds beyond max_loras by default

MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses a temperature above 2

# The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks in vLLM 0.32).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ExampleStyle = Literal["each_op", "addition", "none"]
YieldMode = Literal["device", "engine", "never"]  # SchedulerConfig.yield_to_higher (the rule: clora.sched.policy)
"""Which worked examples open an episode of a tool-use env (clora.envs.tools.worked_examples)."""

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _fail(field: str, problem: str, *, local: str | None = None) -> None:
    raise field_error(field, problem, local=local)


def _positive(field: str, value: float) -> None:
    if not (value > 0):
        _fail(field, f"must be > 0, got {value!r}")


def parse_cpu_list(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}: the syntax of ``taskset -c`` and VLLM_CPU_OMP_THREADS_BIND; ConfigError if malformed."""
    def number(word: str) -> bool:  # ASCII digits only: str.isdigit() also takes '²', which int() refuses
        return word.isascii() and word.isdigit()

    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not number(low) or (dash and (not number(high) or int(low) > int(high))):
            raise ConfigError(f"bad CPU list {text!r}: use numbers and ranges like '0-2,5'")
        cpus.update(range(int(low), int(high if dash else low) + 1))
    return cpus


def validate_tenant_name(name: str) -> str:
    """A tenant name becomes a folder name: letters, digits, '_', '-', '.', no path tricks."""
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name) or ".." in name:
        shown = f"{name[:70]!r}..." if isinstance(name, str) and len(name) > 70 else repr(name)
        problem = (
            f"tenant name {shown}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, no path separators or '..'"
        )
        raise field_error("name", problem, message=problem)
    return name


class _Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    def __post_init__(self) -> None:
        for f in msgspec.structs.fields(self):  # TOML has nan and inf; no field of ours wants them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                prefix = self._field_prefix()
                _fail(f"{prefix}.{f.name}" if prefix else f.name, f"must be a finite number, got {value}")
        self.validate()

    def _field_prefix(self) -> str:
        """How messages of direct construction name this Struct's fields: "optim" -> "optim.lr"."""
        return type(self).__name__.removesuffix("Config").lower()

    def validate(self) -> None:  # overridden where there is something to check
        pass


class ModelConfig(_Config):
    """The base model: "smollm2" (the packaged SmolLM2-135M-Instruct), "tiny" (random, tests) or a HF dir."""

    source: str = "smollm2"
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"  # the engine's; "auto": bf16 where it pays (clora.precision)
    max_model_len: int = 1024
    seed: int = 0  # for the tiny random model

    def validate(self) -> None:
        if not self.source:
            _fail("model.source", "must name 'smollm2', 'tiny' or a model directory")
        if self.max_model_len < 16:
            _fail("model.max_model_len", f"must be >= 16, got {self.max_model_len}")


class EngineConfig(_Config):
    """vLLM engine settings. ``None`` means: clora picks what is fast on this machine."""

    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max_loras + headroom, so updates are never evicted
    max_num_seqs: int = 64
    kv_cache_gib: float = 2.0
    block_size: int | None = None  # KV block in tokens = the prefix cache's unit; None: vLLM's (128 on CPU)
    omp_threads_bind: str | None = None  # e.g. "0-1"; None: all cores this process may use
    use_tcmalloc: bool = True
    extra_env: dict[str, str] = {}

    @property
    def cpu_loras(self) -> int:
        """Tenant adapters vLLM's CPU cache holds (``max_cpu_loras``, default ``max_loras`` + 8)."""
        return self.max_cpu_loras if self.max_cpu_loras else self.max_loras + CPU_LORAS_HEADROOM

    def validate(self) -> None:
        if self.max_loras < 1:
            _fail("engine.max_loras", f"must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            _fail(
                "engine.max_lora_rank",
                f"must be 1, 8, 16, 32, 64, 128, 256, 320 or 512 (vLLM's ranks), got {self.max_lora_rank}",
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            _fail("engine.max_cpu_loras", f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        if self.max_num_seqs < 1:
            _fail("engine.max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _positive("engine.kv_cache_gib", self.kv_cache_gib)
        if self.block_size is not None and (self.block_size < 16 or self.block_size % 16):
            _fail("engine.block_size",
                  f"must be a multiple of 16 (vLLM-CPU prefers multiples of 32), got {self.block_size}")


class LoraConfig(_Config):
    """One tenant's adapter shape."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_seed: int = 0

    def validate(self) -> None:
        if self.rank < 1:
            _fail("lora.rank", f"must be >= 1, got {self.rank}")
        _positive("lora.alpha", self.alpha)
        if not self.target_modules:
            _fail("lora.target_modules", "must name at least one module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class OptimConfig(_Config):
    """AdamW hyperparameters of one tenant and its learning-rate schedule.

    Optimizer step n (n = 0, 1, ...: the tenant's optimizer steps before this one, counted since
    its Adam moments were last reset) uses lr * (n + 1) / warmup_steps while n < warmup_steps;
    after that, with p = (n - warmup_steps) / (total_steps - warmup_steps) clamped to [0, 1] and
    floor = min_lr_ratio * lr: "constant" keeps lr, "linear" uses floor + (lr - floor) * (1 - p),
    "cosine" uses floor + (lr - floor) * (1 + cos(pi * p)) / 2. The last step (n = total_steps - 1)
    is still above the floor; steps past total_steps stay at the floor.
    """

    lr: float = 1e-3  # peak learning rate (the measured recipe: docs/learning.md)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after the warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from lr / warmup_steps up to lr; 0: none
    min_lr_ratio: float = 0.0  # floor of the linear / cosine decay, as a fraction of lr
    total_steps: int | None = None  # optimizer steps the schedule spans; unset: the experiment's steps

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        for name, b in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                _fail(name, f"must be in [0, 1), got {b}")
        _positive("optim.eps", self.eps)
        if self.weight_decay < 0:
            _fail("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            _fail("optim.grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", f"must be >= 0 (0: no warmup), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and self.total_steps < 1:
            _fail("optim.total_steps", f"must be >= 1 when set, got {self.total_steps}")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            _fail("optim.warmup_steps", f"must be <= total_steps ({self.total_steps}), got {self.warmup_steps}")


class LossConfig(_Config):
    """Which policy loss, how it is normalised, and the KL penalty to the base model. Advantages
    come with the data.

    Per trained token, with r = pi_trainer / pi_sampler, A its advantage and sg() a stop-gradient,
    kind "importance_sampling" is -r * A; "ppo" is -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A);
    "cispo" (MiniMax-M1's CISPO) is -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi_trainer, so
    no token loses its gradient, only its weight is bounded (clip_low >= 1 drops the lower bound, as
    the paper does; TRL's cispo epsilon_high is 1 + clip_high, tinker's clip thresholds are
    1 - clip_low and 1 + clip_high); "cross_entropy" is -log pi_trainer.
    normalize: "tokens" divides the summed token losses by the number of trained tokens (DAPO, TRL
    "bnpo"); "sequences" averages each sequence's mean token loss over the sequences that have a
    trained token (GRPO's original, TRL "grpo"); "constant" divides the sum by sequences *
    normalize_constant (Dr. GRPO, TRL "dr_grpo"), so no sequence's length scales its tokens.
    KL penalty to the base model (kl_coef > 0; it costs one extra no-grad forward with the adapter
    routed off, no reference copy): estimator "k3" adds kl_coef * (b - 1 - log b), b = pi_base /
    pi_trainer, to each token's loss, gradient included (GRPO, TRL's beta); "k1" subtracts kl_coef *
    (k - mean k), k = log pi_sampler - log pi_base and the mean over the call's trained tokens, from
    each token's advantage (tinker-cookbook's kl_penalty_coef). Either way the step metric `kl` is
    the estimator's mean over trained tokens (absent when kl_coef is 0).
    """

    kind: Literal["importance_sampling", "ppo", "cispo", "cross_entropy"] = "ppo"  # the per-token loss (above)
    clip_low: float = 0.2  # ppo, cispo: the ratio's lower bound is 1 - clip_low
    clip_high: float = 0.2  # ppo, cispo: the ratio's upper bound is 1 + clip_high
    kl_coef: float = 0.0  # weight of the KL penalty to the base model; 0: off, no extra forward
    kl_estimator: Literal["k3", "k1"] = "k3"  # k3: a term of the loss; k1: a shaping of the advantages
    normalize: Literal["tokens", "sequences", "constant"] = "tokens"  # what the summed loss is divided by (above)
    normalize_constant: float | None = None  # "constant": tokens per sequence; unset: the experiment's max_tokens

    def validate(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            _fail("loss.clip_low/clip_high", "must be >= 0")
        if self.kl_coef < 0:
            _fail("loss.kl_coef", f"must be >= 0, got {self.kl_coef}")
        if self.kind == "cross_entropy" and self.kl_coef > 0:
            _fail("loss.kl_coef", f"must be 0 for kind 'cross_entropy' (a policy-gradient penalty), got {self.kl_coef}")
        if self.normalize_constant is not None and not self.normalize_constant > 0:
            _fail("loss.normalize_constant", f"must be > 0 when set, got {self.normalize_constant}")


class TrainerConfig(_Config):
    """The trainer: device, precision, micro-batching and queue bound."""

    device: str = "auto"  # "auto": cuda when available, else cpu
    autocast_bf16: bool | Literal["auto"] = False  # "auto": on where bf16 pays (CUDA, CPUs with bf16 instructions)
    micro_batch_size: int = 8
    queue_size: int = 16
    num_threads: int | None = None
    fuse_max: int = 1  # most TrainSteps of different tenants fused into one step; 1 = off
    cpus: str | None = None  # e.g. "1": the trainer's threads run only on these cores; None: any
    nice: int = 0  # added to the trainer threads' nice value (0-19): a contested core goes to the engine first
    shared_prefix: bool = True  # prefixes shared by a call's rows computed once, LM head only where needed; false: naive

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            _fail("trainer.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        if self.queue_size < 1:
            _fail("trainer.queue_size", f"must be >= 1 (0 would be unbounded), got {self.queue_size}")
        if self.fuse_max < 1:
            _fail("trainer.fuse_max", f"must be >= 1 (1 = no fusion), got {self.fuse_max}")
        if not 0 <= self.nice <= 19:
            _fail("trainer.nice", f"must be 0-19 (added to the threads' nice value), got {self.nice}")
        if self.cpus is not None:
            try:
                parse_cpu_list(self.cpus)
            except ConfigError:
                _fail("trainer.cpus", f"must be CPU numbers and ranges like '0-2,5', got {self.cpus!r}")


class SchedulerConfig(_Config):
    """How tenants share the engine's LoRA slots and the trainer's device (docs/scheduling.md)."""

    aging_s: float = 30.0  # a tenant waiting this long is served next whatever its priority (no starvation)
    wait_bound_s: float = 60.0  # a wait longer than this logs scheduler.wait_exceeded; 0: never
    max_resident_adapters: int | None = None  # adapters kept in the engine, more are paged; None: engine.cpu_loras
    yield_to_higher: YieldMode = "device"  # while a higher class is active a lower one's new work waits: "device": engine requests and train steps; "engine": engine requests; "never": priorities only order waiters
    linger_s: float = 2.0  # a higher class counts as active this long after its last work ended (the gaps inside its RL step)

    def validate(self) -> None:
        _positive("scheduler.aging_s", self.aging_s)
        if self.linger_s < 0:
            _fail("scheduler.linger_s", f"must be >= 0, got {self.linger_s}")
        if self.wait_bound_s < 0:
            _fail("scheduler.wait_bound_s", f"must be >= 0 (0: no bound), got {self.wait_bound_s}")
        if self.max_resident_adapters is not None and self.max_resident_adapters < 2:
            _fail("scheduler.max_resident_adapters", f"must be >= 2, got {self.max_resident_adapters}")


class PlacementConfig(_Config):
    """Where one Ray actor of the cluster runs: Ray's own resource request (docs/scale-out.md)."""

    num_cpus: float = 1.0  # Ray CPUs reserved for the actor (fractions allowed, e.g. 0.5)
    num_gpus: float = 0.0  # Ray GPUs reserved for it; 1 gives it a device of its own
    resources: dict[str, float] = {}  # custom Ray resources, e.g. {"trainer_node" = 1} or {"node:10.0.0.5" = 0.01}


class ClusterConfig(_Config):
    """Run the sampler(s) and the trainer as Ray actors; tenants and the API stay in this process
    (docs/scale-out.md). Unset (the default): everything in one process."""

    backend: Literal["ray"] = "ray"
    address: str = "auto"  # "auto": the running cluster (RAY_ADDRESS or this machine's head); "local": start one here; "host:port"
    sampler_replicas: int = 1  # vLLM engines, one Ray actor each
    replicas_per_tenant: int = 1  # replicas that hold each tenant's adapter (docs/sampler-pool.md); <= sampler_replicas
    sampler_placement: PlacementConfig = PlacementConfig()  # each replica's resources
    trainer_placement: PlacementConfig = PlacementConfig()  # the trainer's resources (num_gpus = 1: a device of its own)
    start_timeout_s: float = 600.0  # an actor not placed and started by then fails the runtime's start

    def validate(self) -> None:
        address = self.address
        if address not in ("auto", "local"):
            host, colon, port = address.removeprefix("ray://").rpartition(":")
            if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
                _fail("cluster.address", f"must be 'auto', 'local' or 'host:port' (or 'ray://host:port'), got {address!r}")
        if self.sampler_replicas < 1:
            _fail("cluster.sampler_replicas", f"must be >= 1, got {self.sampler_replicas}")
        if not 1 <= self.replicas_per_tenant <= self.sampler_replicas:
            _fail("cluster.replicas_per_tenant",
                  f"must be between 1 and sampler_replicas ({self.sampler_replicas}), got {self.replicas_per_tenant}")
        for name in ("sampler_placement", "trainer_placement"):
            placement: PlacementConfig = getattr(self, name)
            for field in ("num_cpus", "num_gpus"):
                value = getattr(placement, field)
                if not (value >= 0 and math.isfinite(value)):
                    _fail(f"cluster.{name}.{field}", f"must be a finite number >= 0, got {value!r}",
                          local=f"{name}.{field}")
            for key, value in placement.resources.items():
                if not (value > 0 and math.isfinite(value)):
                    _fail(f"cluster.{name}.resources", f"{key!r} must be a finite number > 0, got {value!r}",
                          local=f"{name}.resources")
        _positive("cluster.start_timeout_s", self.start_timeout_s)


class EnvConfig(_Config):
    """Which environment a tenant trains on."""

    kind: Literal["arithmetic", "gsm8k"] = "arithmetic"
    difficulty: int = 1
    path: str | None = None  # jsonl file for gsm8k
    max_turns: int = 3
    seed: int = 0
    held_out_size: int = 32  # problems in each held-out evaluation; one problem is 100 / held_out_size points
    step_timeout_s: float = 60.0  # one env step (tool calls, reward) must return within this; 0: no limit
    examples: ExampleStyle = "each_op"  # worked examples before each question: each_op, addition, none (docs/envs.md)
    single_turn: bool = False  # arithmetic only: answer in one turn, no Calculator (clora.envs.single_turn)

    def validate(self) -> None:
        if self.kind == "gsm8k" and not self.path:
            _fail("env.path", "the gsm8k env needs a jsonl file path")
        if self.single_turn and self.kind != "arithmetic":
            _fail("env.single_turn", f"only the arithmetic env has a single-turn variant, not {self.kind!r}")
        if self.difficulty < 0:
            _fail("env.difficulty", f"must be >= 0, got {self.difficulty}")
        if self.max_turns < 1:
            _fail("env.max_turns", f"must be >= 1, got {self.max_turns}")
        if self.step_timeout_s < 0:
            _fail("env.step_timeout_s", f"must be >= 0 (0: no limit), got {self.step_timeout_s}")
        if self.held_out_size < 1:
            _fail("env.held_out_size", f"must be >= 1, got {self.held_out_size}")


class ExperimentConfig(_Config):
    """One tenant's RL experiment."""

    name: str
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    env: EnvConfig = EnvConfig()
    steps: int = 10
    prompts_per_step: int = 4
    group_size: int = 6  # samples per problem; with 4 problems per step the measured recipe (docs/learning.md)
    max_tokens: int = 32  # per turn: a tool call or a Final Answer of the built-in envs fits in 20
    temperature: float = 1.0
    advantage: Literal["grpo", "grpo_no_std"] = "grpo"  # grpo: (r - mean) / std per group; grpo_no_std: r - mean (Dr. GRPO)
    eval_every: int = 0  # 0: only before and after
    checkpoint_every: int = 1  # steps between checkpoints (also after the last step and on stop); 0: none
    retries: int = 0  # more tries of a rollout (env error, bad reward, step timeout) or a publish; 0: the tenant fails
    retry_backoff_s: float = 1.0  # wait before the first retry, doubled before each further one
    seed: int = 0  # seeds the problem draw and every rollout's sampling (docs/reliability.md#seeds)
    priority: int = 0  # scheduling class: higher is served first (1 interactive, 0 normal, -1 background)
    weight: float = 1.0  # share of device-seconds within its priority class (docs/scheduling.md)
    max_staleness: int = 0  # k: data sampled with version v train into version u only if u - v <= k (docs/async.md)
    stale_policy: Literal["drop", "resample"] = "drop"  # what the trainer does with data past the bound

    def _field_prefix(self) -> str:
        return f"experiments.{self.name}"

    def validate(self) -> None:
        validate_tenant_name(self.name)
        for field in ("steps", "prompts_per_step", "group_size", "max_tokens"):
            if getattr(self, field) < 1:
                _fail(f"experiments.{self.name}.{field}", f"must be >= 1, got {getattr(self, field)}")
        if self.retries < 0:
            _fail(f"experiments.{self.name}.retries", f"must be >= 0 (0: no retry), got {self.retries}")
        _positive(f"experiments.{self.name}.weight", self.weight)
        if self.max_staleness < 0:
            _fail(f"experiments.{self.name}.max_staleness", f"must be >= 0 (0: on-policy), got {self.max_staleness}")
        if self.retry_backoff_s < 0:
            _fail(f"experiments.{self.name}.retry_backoff_s", f"must be >= 0, got {self.retry_backoff_s}")
        if self.checkpoint_every < 0:
            _fail(
                f"experiments.{self.name}.checkpoint_every",
                f"must be >= 0 (0: no checkpoints), got {self.checkpoint_every}",
            )
        if not (0 < self.temperature <= MAX_TEMPERATURE):
            _fail(f"experiments.{self.name}.temperature", f"must be in (0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if self.optim.total_steps is None and self.optim.warmup_steps > self.steps:
            _fail(
                f"experiments.{self.name}.optim.warmup_steps",
                f"must be <= steps ({self.steps}; the schedule spans the experiment), got {self.optim.warmup_steps}",
                local="optim.warmup_steps",
            )

    @property
    def resolved_optim(self) -> OptimConfig:
        """The OptimConfig the trainer gets: an unset ``optim.total_steps`` is this experiment's ``steps``."""
        if self.optim.total_steps is not None:
            return self.optim
        return msgspec.structs.replace(self.optim, total_steps=self.steps)

    @property
    def resolved_loss(self) -> LossConfig:
        """The LossConfig the trainer gets: "constant" normalisation without a constant uses ``max_tokens``."""
        if self.loss.normalize != "constant" or self.loss.normalize_constant is not None:
            return self.loss
        return msgspec.structs.replace(self.loss, normalize_constant=float(self.max_tokens))


class RuntimeConfig(_Config):
    """Everything one runtime needs: base model, engine, trainer, where events go, experiments."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    trainer: TrainerConfig = TrainerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    cluster: ClusterConfig | None = None  # None: one process; set: sampler(s) and trainer on Ray (docs/scale-out.md)
    run_dir: str = "runs/latest"
    experiments: tuple[ExperimentConfig, ...] = ()

    def _field_prefix(self) -> str:
        return ""

    def validate(self) -> None:
        resident = self.scheduler.max_resident_adapters
        if resident is not None and resident <= self.engine.max_loras:
            _fail("scheduler.max_resident_adapters",
                  f"must be > engine.max_loras ({self.engine.max_loras}: a page-in needs an adapter it may page out), "
                  f"got {resident}")
        if resident is not None and resident > self.engine.cpu_loras:
            _fail("scheduler.max_resident_adapters",
                  f"must be <= the engine's CPU cache ({self.engine.cpu_loras}, engine.max_cpu_loras), got {resident}")
        first: dict[str, int] = {}
        for i, e in enumerate(self.experiments):
            if e.name in first:
                _fail(
                    f"experiments[{i}].name", f"duplicate tenant name {e.name!r} (experiments[{first[e.name]}] has it)"
                )
            first[e.name] = i
        for i, e in enumerate(self.experiments):
            if e.lora.rank > self.engine.max_lora_rank:
                _fail(
                    f"experiments[{i}].lora.rank",
                    f"{e.lora.rank} exceeds engine.max_lora_rank {self.engine.max_lora_rank} (tenant {e.name!r})",
                )
            check_fits_model(e, self.model, field=f"experiments[{i}].max_tokens")


def check_fits_model(experiment: ExperimentConfig, model: ModelConfig, *, field: str | None = None) -> None:
    """An experiment's turns must leave room for a prompt in the model's context (max_tokens is never
    silently cut to fit)."""
    if experiment.max_tokens >= model.max_model_len:
        _fail(
            field or f"experiments.{experiment.name}.max_tokens",
            f"{experiment.max_tokens} leaves no room for a prompt in model.max_model_len {model.max_model_len} "
            f"(tenant {experiment.name!r})",
        )


def decode_config(data: bytes | str, type_: type = RuntimeConfig, *, fmt: str = "toml"):
    """Decode TOML (or JSON) into a config Struct; any problem becomes one ConfigError."""
    decode = msgspec.toml.decode if fmt == "toml" else msgspec.json.decode
    try:
        return decode(data, type=type_)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config: {describe_validation_error(e, type_)}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"malformed {fmt.upper()}: {e}") from None


def load_toml(path: str | Path, type_: type = RuntimeConfig):
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return decode_config(p.read_bytes(), type_)


def _drop_none(value):
    """TOML has no null: an unset optional field is written by leaving it out.

    Safe because every optional field defaults to None.
    """
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def dump_toml(config: msgspec.Struct) -> bytes:
    return msgspec.toml.encode(_drop_none(msgspec.to_builtins(config)))
