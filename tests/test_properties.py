"""Property-based tests (hypothesis).

(a) Every msgspec Struct in clora.messages and every config Struct round-trips through msgpack
    and JSON (and the RuntimeConfig through TOML) for generated values. Strategies are built from
    each Struct's field types with msgspec.inspect; config fields whose validate() restricts them
    get strategies within their valid range. ``Any`` fields (trainer-local hand-offs) get plain
    msgpack/JSON values.
(b) The adapter store swap round trip: for random small shapes, ranks and source dtypes, a store's
    tensors go into the LoRA slot layers and back out (working copy, write-back, PEFT copies,
    StoreState host copies) bit-identical, and an interleaving of swaps between several stores
    never mixes their values.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import msgspec
import msgspec.inspect as mi
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from clora import config as config_module
from clora import messages
from clora.config import (
    VLLM_LORA_RANKS,
    LoraConfig,
    OptimConfig,
    RuntimeConfig,
    decode_config,
    dump_toml,
)
from clora.errors import ConfigError
from clora.trainer import (
    AdapterStore,
    TrainerCore,
    lora_key,
    lora_layers,
    swap_in,
    write_back,
)
from clora.trainer.peft_io import peft_state_dict, store_key
from clora.trainer.step_parts import bound_slots

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- (a) strategies from types

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no nan/inf (msgspec writes null)
TEXT = st.text(max_size=20)
PLAIN = st.recursive(  # what an ``Any`` field can carry through msgpack and JSON unchanged
    st.none() | st.booleans() | INT64 | FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)

SMALL = st.integers(1, 64)
UNIT = st.floats(0.0, 0.999)
POSITIVE = st.floats(1e-6, 1e3)
NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True)
# Fields whose validation restricts them (configs' validate(), SamplingSpec's checks), by "Struct.field";
# every other field is free.
CONFIG_FIELDS: dict[str, st.SearchStrategy] = {
    "ModelConfig.source": st.text(min_size=1, max_size=20),
    "ModelConfig.max_model_len": st.integers(16, 2**20),
    "EngineConfig.max_loras": SMALL,
    "EngineConfig.max_lora_rank": st.sampled_from([r for r in VLLM_LORA_RANKS if r >= 16]),
    "EngineConfig.max_cpu_loras": st.none() | st.integers(64, 128),
    "EngineConfig.max_num_seqs": SMALL,
    "EngineConfig.kv_cache_gib": POSITIVE,
    "LoraConfig.rank": st.integers(1, 16),
    "LoraConfig.alpha": POSITIVE,
    "LoraConfig.target_modules": st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4).map(tuple),
    "OptimConfig.lr": POSITIVE,
    "OptimConfig.beta1": UNIT,
    "OptimConfig.beta2": UNIT,
    "OptimConfig.eps": POSITIVE,
    "OptimConfig.weight_decay": UNIT,
    "OptimConfig.grad_clip": UNIT,
    "OptimConfig.warmup_steps": st.integers(0, 8),
    "OptimConfig.min_lr_ratio": UNIT,
    "OptimConfig.total_steps": st.none() | st.integers(8, 64),
    "LossConfig.clip_low": UNIT,
    "LossConfig.clip_high": UNIT,
    "LossConfig.kl_coef": st.just(0.0) | UNIT,  # kind "cross_entropy" refuses a penalty
    "LossConfig.normalize_constant": st.none() | POSITIVE,
    "TrainerConfig.micro_batch_size": SMALL,
    "TrainerConfig.queue_size": SMALL,
    "TrainerConfig.fuse_max": SMALL,
    "EnvConfig.kind": st.just("arithmetic"),
    "EnvConfig.difficulty": st.integers(0, 9),
    "EnvConfig.max_turns": SMALL,
    "ExperimentConfig.name": NAME,
    "ExperimentConfig.steps": SMALL,
    "ExperimentConfig.prompts_per_step": SMALL,
    "ExperimentConfig.group_size": SMALL,
    "ExperimentConfig.max_tokens": SMALL,
    "ExperimentConfig.temperature": st.floats(1e-6, 2.0),
    "SamplingSpec.n": SMALL,
    "SamplingSpec.max_tokens": SMALL,
    "SamplingSpec.temperature": st.floats(0.0, 2.0),
    "SamplingSpec.top_p": st.floats(1e-6, 1.0),
    "SamplingSpec.seed": st.none() | st.integers(0, 2**63 - 1),
    "SamplingSpec.stop": st.lists(st.text(min_size=1, max_size=20), max_size=4).map(tuple),
    "ExperimentConfig.eval_every": st.integers(0, 64),
    "ExperimentConfig.checkpoint_every": st.integers(0, 64),
    "ClusterConfig.address": st.sampled_from(["auto", "local"])
    | st.builds("{}{}:{}".format, st.sampled_from(["", "ray://"]), NAME, st.integers(1, 65535)),
    "ClusterConfig.sampler_replicas": st.integers(1, 8),
    "ClusterConfig.replicas_per_tenant": st.integers(1, 2),  # <= sampler_replicas: only 1 replica with 2 rejects
    "ClusterConfig.start_timeout_s": POSITIVE,
    "PlacementConfig.num_cpus": st.floats(0.0, 64.0),
    "PlacementConfig.num_gpus": st.floats(0.0, 8.0),
    "PlacementConfig.resources": st.dictionaries(TEXT, POSITIVE, max_size=3),
}


VALIDATED_MESSAGES = (messages.SamplingSpec,)  # messages that check their values like configs do


def _valid_or_reject(cls: type, kwargs: dict) -> msgspec.Struct:
    try:
        return cls(**kwargs)
    except ConfigError:
        from hypothesis import reject

        reject()


def from_type(info: mi.Type) -> st.SearchStrategy:
    """A strategy of values of the msgspec type ``info`` (Structs recursively)."""
    simple: dict[type, Callable[[mi.Type], st.SearchStrategy]] = {
        mi.IntType: lambda _: INT64,
        mi.FloatType: lambda _: FLOATS,
        mi.StrType: lambda _: TEXT,
        mi.BoolType: lambda _: st.booleans(),
        mi.NoneType: lambda _: st.none(),
        mi.AnyType: lambda _: PLAIN,
        mi.LiteralType: lambda t: st.sampled_from(t.values),
        mi.ListType: lambda t: st.lists(from_type(t.item_type), max_size=4),
        mi.VarTupleType: lambda t: st.lists(from_type(t.item_type), max_size=4).map(tuple),
        mi.DictType: lambda t: st.dictionaries(from_type(t.key_type), from_type(t.value_type), max_size=4),
        mi.UnionType: lambda t: st.one_of(*(from_type(x) for x in t.types)),
    }
    if type(info) in simple:
        return simple[type(info)](info)
    if isinstance(info, mi.StructType):
        return struct_strategy(info.cls)
    raise NotImplementedError(f"no strategy for {info!r}: add one to from_type")


def struct_strategy(cls: type) -> st.SearchStrategy:
    info = mi.type_info(cls)
    if cls.__module__ != config_module.__name__ and cls not in VALIDATED_MESSAGES:
        return st.builds(cls, **{f.name: from_type(f.type) for f in info.fields})
    fields = {}
    for f in info.fields:
        free = CONFIG_FIELDS.get(f"{cls.__name__}.{f.name}", from_type(f.type))
        default = f.default if f.default is not msgspec.NODEFAULT else None
        # Unlisted fields: half the time their default, so a new constrained field rarely rejects.
        fields[f.name] = free if default is None or f"{cls.__name__}.{f.name}" in CONFIG_FIELDS \
            else st.one_of(st.just(default), free)
    if cls is RuntimeConfig:
        fields["experiments"] = st.lists(
            struct_strategy(config_module.ExperimentConfig), max_size=3, unique_by=lambda e: e.name
        ).map(tuple)
    return st.fixed_dictionaries(fields).map(lambda kwargs: _valid_or_reject(cls, kwargs))


MESSAGE_TYPES = sorted(
    (obj for obj in vars(messages).values()
     if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == messages.__name__),
    key=lambda c: c.__name__,
)
CONFIG_TYPES = sorted(
    (obj for obj in vars(config_module).values()
     if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == config_module.__name__
     and not obj.__name__.startswith("_")),
    key=lambda c: c.__name__,
)
UNIONS = {"SamplerMsg": messages.SamplerMsg, "TrainerMsg": messages.TrainerMsg, "SyncMsg": messages.SyncMsg}


def test_every_message_and_config_struct_is_covered():
    assert len(MESSAGE_TYPES) >= 25 and {"SampleRequest", "Datum", "StoreState"} <= {c.__name__ for c in MESSAGE_TYPES}
    assert {c.__name__ for c in CONFIG_TYPES} >= {
        "ModelConfig", "EngineConfig", "LoraConfig", "OptimConfig", "LossConfig", "TrainerConfig", "EnvConfig",
        "ExperimentConfig", "RuntimeConfig",
    }
    for cls in MESSAGE_TYPES + CONFIG_TYPES:
        struct_strategy(cls)  # every field type has a strategy


def _round_trip(value: msgspec.Struct, type_: object) -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type_) == value
    assert msgspec.json.decode(msgspec.json.encode(value), type=type_) == value


@pytest.mark.parametrize("cls", MESSAGE_TYPES + CONFIG_TYPES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_struct_round_trips_msgpack_and_json(cls, data):
    value = data.draw(struct_strategy(cls))
    _round_trip(value, cls)
    for union in UNIONS.values():  # a tagged message decodes as its inbox's union too
        if cls in typing.get_args(union):
            _round_trip(value, union)


@SETTINGS
@given(cfg=struct_strategy(RuntimeConfig))
def test_runtime_config_round_trips_through_toml(cfg):
    assert decode_config(dump_toml(cfg)) == cfg


@SETTINGS
@given(value=FLOATS | st.sampled_from([math.inf, -math.inf, -0.0, 5e-324]))
def test_msgpack_keeps_every_float_bit(value):
    completion = messages.Completion(token_ids=[1], logprobs=[value], text="", finish_reason=None)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(completion), type=messages.Completion)
    assert math.copysign(1.0, back.logprobs[0]) == math.copysign(1.0, value) and back.logprobs[0] == value


# ----------------------------------------------------------------------------- (b) adapter store swaps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Toy(nn.Module):
    """Two blocks of named linear layers: LoRA targets "q_proj" and "up_proj" (different shapes)."""

    def __init__(self, sizes: list[tuple[int, int, int]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(h, q, bias=False), "up_proj": nn.Linear(h, u, bias=False)})
            for h, q, u in sizes
        )


@st.composite
def adapters(draw, n_min: int = 1, n_max: int = 1):
    """(model core, [(store, source tensors in their drawn dtype)]) for n random stores."""
    sizes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=2))
    core = TrainerCore(Toy(sizes), device="cpu")
    n = draw(st.integers(n_min, n_max))
    stores = []
    for i in range(n):
        targets = draw(st.sampled_from([("q_proj",), ("up_proj",), ("q_proj", "up_proj")]))
        column = {"q_proj": 1, "up_proj": 2}
        limit = min(min(size[0], size[column[t]]) for size in sizes for t in targets)  # rank <= a layer's smaller side
        lora = LoraConfig(rank=draw(st.integers(1, min(4, limit))), alpha=draw(POSITIVE), target_modules=targets,
                          init_seed=i)
        dtype = draw(st.sampled_from(DTYPES))
        store = core.add_tenant(f"t{i}", lora, OptimConfig())
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        source = {k: torch.randn(t.shape, generator=gen).to(dtype) for k, t in store.params.items()}
        store.replace_weights(source)  # host fp32 masters from the drawn dtype (exact: fp32 holds bf16/fp16)
        for part in (store.exp_avg, store.exp_avg_sq, store.grads):
            for t in part.values():
                t.copy_(torch.randn(t.shape, generator=gen))
        stores.append((store, source))
    return core, stores


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so -0.0 != 0.0 and NaN payloads count)."""
    return t.detach().contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _clone(store: AdapterStore) -> dict[str, dict[str, torch.Tensor]]:
    return {part: {k: t.clone() for k, t in getattr(store, part).items()}
            for part in ("params", "exp_avg", "exp_avg_sq", "grads")}


def _slot_tensors(core: TrainerCore, slot: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(core.model).items():
        bound = layer.slots[slot] if slot < len(layer.slots) else None
        if bound is not None:
            out[lora_key(name, "A")], out[lora_key(name, "B")] = bound.a, bound.b
    return out


@SETTINGS
@given(case=adapters())
def test_swap_in_bind_and_write_back_is_bit_identical(case):
    core, [(store, source)] = case
    assert same_bits({k: t.to(source[k].dtype) for k, t in store.params.items()}, source)
    before = _clone(store)
    work = swap_in(store, core.device, trainable=True, optim_state=True, grads=True)
    with bound_slots(core.model, core.routing, [(store, work)]):
        assert same_bits(_slot_tensors(core, 0), store.params)  # the layers hold exactly the store's weights
    assert _slot_tensors(core, 0) == {}, "unbound after the step"
    write_back(store, work, params=True, optim_state=True, grads=True)
    assert all(same_bits(getattr(store, part), before[part]) for part in before)
    # PEFT copies (what the sampler gets) and the StoreState host copies (what a checkpoint gets)
    peft = {store_key(k): v for k, v in peft_state_dict(store).items()}
    assert same_bits(peft, store.params)
    state = store.export_state()
    assert all(same_bits(getattr(state, part), before[part]) for part in before)
    for part in before:  # the copies are copies: scribbling on them leaves the store alone
        for t in getattr(state, part).values():
            t.add_(1.0)
    assert all(same_bits(getattr(store, part), before[part]) for part in before)


@SETTINGS
@given(case=adapters(n_min=2, n_max=4), data=st.data())
def test_interleaved_swaps_of_several_stores_never_mix_their_values(case, data):
    core, pairs = case
    stores = [s for s, _ in pairs]
    expected = {s.tenant: _clone(s) for s in stores}
    ops = data.draw(st.lists(st.tuples(st.permutations(range(len(stores))), st.integers(1, len(stores)),
                                       st.booleans(), st.floats(-2, 2)), min_size=1, max_size=6))
    for order, k, commit, delta in ops:
        chosen = [stores[i] for i in order[:k]]  # k stores bound into slots 0..k-1, in a random order
        works = [swap_in(s, core.device, trainable=True, optim_state=True, grads=True) for s in chosen]
        with bound_slots(core.model, core.routing, list(zip(chosen, works))):
            for slot, (store, work) in enumerate(zip(chosen, works)):
                got = _slot_tensors(core, slot)
                assert same_bits(got, store.params), f"slot {slot} holds another tenant's weights"
            for work in works:  # a "step" on each working copy
                with torch.no_grad():
                    for t in work.params.values():
                        t.add_(delta)
        for store, work in zip(chosen, works):
            if commit:
                write_back(store, work, params=True, optim_state=True, grads=True)
                expected[store.tenant]["params"] = {k: t.detach().clone() for k, t in work.params.items()}
        for store in stores:  # each store holds its own values: committed ones, or untouched
            assert all(same_bits(getattr(store, part), expected[store.tenant][part]) for part in expected[store.tenant])
    assert all(_slot_tensors(core, slot) == {} for slot in range(len(stores)))


@SETTINGS
@given(case=adapters(n_min=2, n_max=3))
def test_a_store_never_sees_a_module_it_does_not_target(case):
    """Binding tenant i into a slot clears that slot in layers i does not target, so a module the
    previous tenant in that slot trained is never left behind."""
    core, pairs = case
    for store, _ in pairs:
        work = swap_in(store, core.device)
        with bound_slots(core.model, core.routing, [(store, work)]):
            bound = _slot_tensors(core, 0)
            assert {k.rsplit(".", 1)[0] for k in bound} == set(store.shapes)
