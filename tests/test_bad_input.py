"""Bad input table (no vLLM): each bad input gets ONE clear error naming the field or the problem,
raised before anything changes, so whatever else exists keeps running unchanged.

Rows: malformed config (unknown keys, wrong types, out-of-range and non-finite numbers, bad
choices, rank above the engine's max, duplicate and unsafe tenant names), unsafe tenant names,
empty and malformed GSM8K-style dataset files, an unknown LoRA target module, train data longer
than the trainer accepts or outside the vocabulary, a max_model_len the model cannot hold and a
trainer device that does not exist. The engine-level rows are in test_bad_input_vllm.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest
import torch

from clora.config import (
    VLLM_LORA_RANKS,
    EngineConfig,
    EnvConfig,
    ExperimentConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainerConfig,
    decode_config,
    load_toml,
    validate_tenant_name,
)
from clora.sampler.engine import check_model_len
from clora.envs import make_env
from clora.errors import (
    AdapterMismatchError,
    ConfigError,
    DuplicateTenantError,
    PromptTooLongError,
)
from clora.trainer import TrainerCore, lora_layers, resolve_device
from clora.trainer.fused import FusedRequest
from clora.messages import Datum
from clora.runtime import Runtime

TWO = "[[experiments]]\nname = 'a'\n[[experiments]]\nname = 'b'\n"  # experiments[1] is 'b'

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # unknown keys: the dotted path of the key, and the valid keys at that place
        ("modle = 1\n", "modle: unknown field; valid fields here: model, engine, trainer, scheduler, cluster, run_dir, experiments"),
        ("[model]\nsourc = 'tiny'\n",
         "model.sourc: unknown field; valid fields here: source, dtype, max_model_len, seed"),
        (TWO + "[experiments.optim]\nlearning_rate = 0.1\n",
         "experiments[1].optim.learning_rate: unknown field; valid fields here: lr, beta1, beta2"),
        # wrong types
        ("[engine]\nmax_loras = 'four'\n", "engine.max_loras: expected int, got str"),
        ("experiments = 3\n", "experiments: expected array, got int"),
        (TWO + "[experiments.lora]\ntarget_modules = ['q_proj', 3]\n",
         "experiments[1].lora.target_modules[1]: expected str, got int"),
        (TWO + "steps = 2.5\n", "experiments[1].steps: expected int, got float"),
        ("[engine]\nextra_env = {A = 1}\n", "engine.extra_env[...]: expected str, got int"),
        # out-of-range and non-finite numbers
        (TWO + "[experiments.optim]\nlr = -1.0\n", "experiments[1].optim.lr: must be > 0, got -1.0"),
        (TWO + "[experiments.optim]\nweight_decay = nan\n",
         "experiments[1].optim.weight_decay: must be a finite number, got nan"),
        (TWO + "[experiments.loss]\nkl_coef = inf\n", "experiments[1].loss.kl_coef: must be a finite number, got inf"),
        (TWO + "[experiments.optim]\nbeta2 = 1.0\n", "experiments[1].optim.beta2: must be in [0, 1), got 1.0"),
        (TWO + "group_size = 0\n", "experiments[1].group_size: must be >= 1, got 0"),
        ("[trainer]\nqueue_size = 0\n", "trainer.queue_size: must be >= 1 (0 would be unbounded), got 0"),
        ("[model]\nmax_model_len = 8\n", "model.max_model_len: must be >= 16, got 8"),
        ("[engine]\nkv_cache_gib = inf\n", "engine.kv_cache_gib: must be a finite number, got inf"),
        # choices
        ("[model]\ndtype = 'float16'\n", "model.dtype: invalid value 'float16'; use one of 'auto', 'bfloat16', 'float32'"),
        (TWO + "[experiments.loss]\nkind = 'grpo'\n",
         "experiments[1].loss.kind: invalid value 'grpo'; use one of 'cispo', 'cross_entropy', 'importance_sampling', 'ppo'"),
        ("[engine]\nmax_lora_rank = 12\n",
         "engine.max_lora_rank: must be 1, 8, 16, 32, 64, 128, 256, 320 or 512 (vLLM's ranks), got 12"),
        # rank above the engine's max (checked in the config, before anything starts)
        (TWO + "[experiments.lora]\nrank = 32\n",
         "experiments[1].lora.rank: 32 exceeds engine.max_lora_rank 16 (tenant 'b')"),
        # names
        ("[[experiments]]\nsteps = 1\n", "experiments[0].name: missing; this field is required"),
        (TWO + "[[experiments]]\nname = 'a'\n",
         "experiments[2].name: duplicate tenant name 'a' (experiments[0] has it)"),
        ("[[experiments]]\nname = '../etc'\n", "experiments[0].name: tenant name '../etc': use 1-64 letters"),
        (TWO + "[experiments.env]\nkind = 'gsm8k'\n", "experiments[1].env.path: the gsm8k env needs a jsonl file path"),
        # not TOML at all
        ("[model\n", "malformed TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"),
    ],
)
def test_bad_config_is_one_error_naming_the_dotted_field(toml, message):
    with pytest.raises(ConfigError) as err:
        decode_config(toml)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0, "one line"


def test_bad_config_file_is_refused_by_load_toml_too(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TWO + "[experiments.optim]\nlr = 0.0\n")
    with pytest.raises(ConfigError, match=re.escape("experiments[1].optim.lr: must be > 0, got 0.0")):
        load_toml(path)


def test_direct_construction_names_the_field_too():
    with pytest.raises(ConfigError, match=re.escape("optim.grad_clip: must be a finite number, got nan")):
        OptimConfig(grad_clip=float("nan"))
    with pytest.raises(ConfigError, match=re.escape("loss.clip_high: must be a finite number, got inf")):
        LossConfig(clip_high=float("inf"))
    with pytest.raises(ConfigError, match=re.escape("engine.max_lora_rank: must be 1, 8, 16,")):
        EngineConfig(max_lora_rank=0)


def test_vllm_lora_ranks_match_the_installed_vllm():
    import typing

    from vllm.config.lora import MaxLoRARanks

    assert VLLM_LORA_RANKS == typing.get_args(MaxLoRARanks)
    with pytest.raises(ConfigError) as err:
        EngineConfig(max_lora_rank=2)
    listed = re.search(r"must be (.*) or (\d+) \(", str(err.value))
    assert tuple(int(r) for r in listed[1].split(", ")) + (int(listed[2]),) == VLLM_LORA_RANKS


# ----------------------------------------------------------------------------- tenant names

BAD_NAMES = [
    "a/b", "/abs", "a\\b", "..", "../x", "a..b", ".hidden", "-flag", "", " ", "  a", "a b", "a\n", "\t", "a\x00b",
    "x" * 65, "x" * 10_000, "tenant:1", "é",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_unsafe_tenant_names_are_refused_everywhere(name, tmp_path):
    with pytest.raises(ConfigError, match="tenant name .*: use 1-64 letters") as err:
        validate_tenant_name(name)
    assert len(str(err.value)) < 300, "a very long name is shown shortened"
    with pytest.raises(ConfigError, match=re.escape("experiments[0].name: tenant name")):
        decode_config(json.dumps({"experiments": [{"name": name}]}), fmt="json")
    # The runtime refuses it before anything happens: no tenant claimed, no folder made.
    rt = Runtime(RuntimeConfig(), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError):
        rt._claim(name, LoraConfig())
    assert rt._tenants == set() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["a", "x" * 64, "run-1.v2_b", "0"])
def test_safe_tenant_names_pass(name):
    assert validate_tenant_name(name) == name


def test_runtime_claims_refuse_a_duplicate_and_a_rank_above_the_engine_max_without_losing_the_first(tmp_path):
    rt = Runtime(RuntimeConfig(engine=EngineConfig(max_lora_rank=16)), run_dir=tmp_path / "run")
    rt._claim("a", LoraConfig(rank=8))
    with pytest.raises(DuplicateTenantError, match="tenant 'a' already exists in this runtime"):
        rt._claim("a", LoraConfig(rank=8))
    with pytest.raises(AdapterMismatchError, match="lora.rank 32 of tenant 'b' exceeds engine.max_lora_rank 16"):
        rt._claim("b", LoraConfig(rank=32))
    assert rt._tenants == {"a"}


# ----------------------------------------------------------------------------- dataset files


def _file(tmp_path: Path, content: bytes | str, name: str = "problems.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = json.dumps({"question": "What is 2 plus 3?", "answer": "#### 5"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no problems (the file is empty)"),
        ("\n  \n\n", "no problems (the file is empty)"),
        (f"{GOOD}\n{{\"question\": \"q\", \n",
         ":2: not valid JSON (Expecting property name enclosed in double quotes)"),
        (f"{GOOD}\n\n[1, 2]\n", ":3: expected a JSON object with 'question' and 'answer'"),
        (f"{GOOD}\n" + json.dumps({"answer": "3"}), ":2: 'question' must be non-empty text"),
        (f"{GOOD}\n" + json.dumps({"question": "q?"}), ":2: missing 'answer'"),
        (f"{GOOD}\n{GOOD.replace('5', 'five')}\n",
         ":2: 'answer' must be a number or end with '#### <number>', got '#### five'"),
        (f"{GOOD}\n" + json.dumps({"question": "q?", "answer": [1]}), ":2: 'answer' must be a number"),
        (GOOD.encode() + b"\n\xff\xfe\n", "not UTF-8 text (invalid start byte at byte"),
    ],
    ids=["empty", "blank", "bad-json", "not-object", "no-question", "no-answer", "non-numeric", "list-answer",
         "not-utf8"],
)
def test_bad_dataset_file_names_the_file_and_line(tmp_path, content, message):
    path = _file(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        make_env(EnvConfig(kind="gsm8k", path=str(path)))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_dataset_file_names_the_field_and_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=re.escape(f"env.path: problem file '{missing}' does not exist")):
        make_env(EnvConfig(kind="gsm8k", path=str(tmp_path / "nope.jsonl")))


# ----------------------------------------------------------------------------- the trainer (tiny model)


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path) -> TrainerCore:
    core = TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig(micro_batch_size=4))
    core.add_tenant("keep", LoraConfig(rank=4, init_seed=1), OptimConfig(lr=1e-2))
    return core


def _datum(tokens: list[int]) -> Datum:
    n = len(tokens)
    return Datum(tokens=tokens, loss_mask=[0.0] + [1.0] * (n - 1), advantages=[0.0] + [1.0] * (n - 1),
                 sampler_logprobs=[0.0] + [-6.0] * (n - 1))


def _state(core: TrainerCore, tenant: str) -> tuple[int, dict[str, torch.Tensor]]:
    store = core.store(tenant)
    return store.version, {k: t.clone() for k, t in {**store.params, **store.exp_avg, **store.grads}.items()}


def _same(a: tuple[int, dict[str, torch.Tensor]], b: tuple[int, dict[str, torch.Tensor]]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_unknown_target_module_names_it_and_lists_the_valid_ones_and_changes_nothing(core):
    layers_before, stores_before = set(lora_layers(core.model)), set(core.stores)
    with pytest.raises(AdapterMismatchError) as err:
        core.add_tenant("x", LoraConfig(target_modules=("q_proj", "qkv_proj")), OptimConfig())
    assert str(err.value) == (
        "target module 'qkv_proj' does not exist in the base model (its linear layers are down_proj, gate_proj, "
        "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"
    )
    assert set(lora_layers(core.model)) == layers_before and set(core.stores) == stores_before


def test_rank_above_a_layer_size_is_refused_at_add_time(core):
    with pytest.raises(AdapterMismatchError, match="rank 512 is larger than .* allows"):
        core.add_tenant("x", LoraConfig(rank=512), OptimConfig())
    assert "x" not in core.stores


def test_train_data_longer_than_the_trainer_accepts_is_refused_before_any_work(core):
    limit = core.max_seq_len
    assert limit == 1024  # the tiny model's max_position_embeddings
    before = _state(core, "keep")
    for call in (
        lambda d: core.train_step("keep", d, LossConfig()),
        lambda d: core.forward_backward("keep", d, LossConfig()),
        lambda d: core.compute_logprobs("keep", d),
    ):
        with pytest.raises(PromptTooLongError) as err:
            call([_datum([5] * 20), _datum([5] * (limit + 1))])
        assert str(err.value) == (
            f"tenant 'keep': datum 1 has {limit + 1} tokens; the trainer accepts at most {limit} "
            "(the base model's max_position_embeddings)"
        )
    assert _same(before, _state(core, "keep"))
    core.train_step("keep", [_datum([5] * limit)], LossConfig())  # exactly the limit trains
    assert core.store("keep").version == before[0] + 1


def test_token_outside_the_vocabulary_is_refused_before_any_work(core):
    before = _state(core, "keep")
    vocab = core.vocab_size
    expected = f"datum 0: token id {vocab} at position 2 is outside the vocabulary [0, {vocab})"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        core.train_step("keep", [_datum([1, 2, vocab, 3])], LossConfig())
    with pytest.raises(ConfigError, match=re.escape("datum 0: token id -1 at position 1")):
        core.forward_backward("keep", [_datum([1, -1, 3])], LossConfig())
    assert _same(before, _state(core, "keep"))


def test_fused_step_refuses_only_the_too_long_request(core):
    core.add_tenant("other", LoraConfig(rank=4, init_seed=2), OptimConfig(lr=1e-2))
    try:
        keep_before = _state(core, "keep")
        other_version = core.store("other").version
        outcomes = core.train_steps_fused([
            FusedRequest(tenant="keep", data=[_datum([5] * (core.max_seq_len + 1))], loss=LossConfig()),
            FusedRequest(tenant="other", data=[_datum([7] * 16)], loss=LossConfig()),
        ])
        assert isinstance(outcomes[0], PromptTooLongError) and "the trainer accepts at most" in str(outcomes[0])
        assert isinstance(outcomes[1], dict) and core.store("other").version == other_version + 1
        assert _same(keep_before, _state(core, "keep"))
    finally:
        core.remove_tenant("other")


# ----------------------------------------------------------------------------- model and device


def test_max_model_len_above_the_models_context_is_refused_before_vllm_starts(tiny_model_dir):
    check_model_len(tiny_model_dir, 1024)  # the tiny model's own limit is fine
    with pytest.raises(ConfigError, match=re.escape(
        "model.max_model_len: 4096 exceeds the base model's max_position_embeddings 1024"
    )):
        check_model_len(tiny_model_dir, 4096)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", "trainer.device: 'gpu0' is not a torch device"),
        ("cuda", "trainer.device: 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'"),
    ],
)
def test_trainer_device_that_does_not_exist_names_the_field(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_device(device)


# ----------------------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n": 0}, "sampling.n: must be >= 1 (completions per prompt), got 0"),
        ({"max_tokens": 0}, "sampling.max_tokens: must be >= 1, got 0"),
        ({"temperature": -0.5}, "sampling.temperature: must be in [0, 2] (0 is greedy), got -0.5"),
        ({"temperature": 2.5}, "sampling.temperature: must be in [0, 2] (0 is greedy), got 2.5"),
        ({"temperature": float("nan")}, "sampling.temperature: must be in [0, 2] (0 is greedy), got nan"),
        ({"top_p": 0.0}, "sampling.top_p: must be in (0, 1], got 0.0"),
        ({"seed": -1}, "sampling.seed: must be in [0, 2**63) or None, got -1"),
        ({"stop": ("</tool>", "")}, "sampling.stop: a stop string must not be empty"),
    ],
)
def test_bad_sampling_parameters_are_one_config_error_naming_the_field(changes, message):
    from clora.messages import SampleRequest, SamplingSpec

    with pytest.raises(ConfigError) as err:
        SamplingSpec(**changes)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=re.escape(message)):  # replacing a good one checks too
        msgspec.structs.replace(SamplingSpec(), **changes)
    if changes.get("temperature") == changes.get("temperature"):  # nan has no JSON form
        wire = msgspec.json.encode({"type": "SampleRequest", "tenant": None, "prompt_token_ids": [1],
                                    "sampling": {**msgspec.to_builtins(SamplingSpec()), **changes}})
        with pytest.raises(msgspec.ValidationError, match=re.escape(message.split(": ", 1)[1])):
            msgspec.json.decode(wire, type=SampleRequest)


def test_an_experiment_whose_max_tokens_fill_the_context_is_refused_not_capped():
    experiment = ExperimentConfig(name="a", max_tokens=2048)
    with pytest.raises(ConfigError) as err:
        RuntimeConfig(model=ModelConfig(max_model_len=1024), experiments=(experiment,))
    assert str(err.value) == ("experiments[0].max_tokens: 2048 leaves no room for a prompt in model.max_model_len "
                              "1024 (tenant 'a')")
    toml = "[model]\nmax_model_len = 512\n[[experiments]]\nname = 'a'\nmax_tokens = 512\n"
    with pytest.raises(ConfigError, match=re.escape("experiments[0].max_tokens: 512 leaves no room")):
        decode_config(toml)
    with pytest.raises(ConfigError, match=re.escape("experiments.a.temperature: must be in (0, 2], got 3.0")):
        ExperimentConfig(name="a", temperature=3.0)
