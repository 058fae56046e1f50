"""clora.checkpoint.format on its own (no vLLM, no model): round trip, atomic commit, corruption, mismatches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest
import torch

from clora.checkpoint.format import (
    MANIFEST_FILE,
    BaseModelIdentity,
    TenantProgress,
    base_model_identity,
    checkpoint_steps,
    has_checkpoint,
    read_checkpoint,
    read_manifest,
    remove_checkpoint,
    restore_rng,
    rng_state,
    state_digest,
    write_checkpoint,
)
from clora.checkpoint.compat import check_compatible
from clora.config import LoraConfig, OptimConfig
from clora.errors import AdapterMismatchError, CheckpointError
from clora.trainer.store import AdapterStore

pytestmark = pytest.mark.timeout(60)

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8)}


def _fake_model(folder: Path, *, hidden: int = 16, layers: int = 2, weights: bytes = b"w" * 4096) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": 100,
              "_name_or_path": str(folder), "transformers_version": "4.x"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def base(tmp_path) -> BaseModelIdentity:
    return base_model_identity(_fake_model(tmp_path / "base"))


def _trained_store(seed: int = 0, *, accumulating: bool = False) -> AdapterStore:
    """A store whose every tensor and counter differs from a fresh one."""
    gen = torch.Generator().manual_seed(seed)
    store = AdapterStore.create("t", LORA, OptimConfig(lr=1e-3), SHAPES)
    for part in (store.params, store.exp_avg, store.exp_avg_sq):
        for t in part.values():
            t.copy_(torch.randn(t.shape, generator=gen))
    store.step, store.adam_step = 5, 3
    if accumulating:
        for t in store.grads.values():
            t.copy_(torch.randn(t.shape, generator=gen))
        store.grad_weight, store.grad_normalize = 12.0, "tokens"
    return store


def _progress(step: int, rng: random.Random | None = None) -> TenantProgress:
    rng = rng or random.Random(7)
    records = [{"step": s, "adapter_version": s, "reward_mean": 0.5, "time_rollout_s": 1.0, "time_train_s": 0.5,
                "time_sync_s": 0.1, "trained": True, "accuracy": None} for s in range(1, step + 1)]
    return TenantProgress(step=step, rng=rng_state(rng), accuracy_start=0.25, started_at=1.0e9,
                          tokens_sampled=321, records=records)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accumulating", [False, True])
def test_round_trip_restores_every_tensor_counter_and_the_rng_stream(tmp_path, base, accumulating):
    store = _trained_store(accumulating=accumulating)
    rng = random.Random(42)
    rng.random()
    path, size = write_checkpoint(tmp_path / "ck", store.export_state(), _progress(2, rng), base)
    expected_next = [rng.random() for _ in range(5)]

    ckpt = read_checkpoint(tmp_path / "ck")
    state = ckpt.state
    assert path == tmp_path / "ck" / MANIFEST_FILE and size > 0
    assert (state.version, state.adam_step, state.grad_weight, state.grad_normalize) == (
        5, 3, store.grad_weight, store.grad_normalize)
    for mine, theirs in ((store.params, state.params), (store.exp_avg, state.exp_avg),
                         (store.exp_avg_sq, state.exp_avg_sq), (store.grads, state.grads)):
        assert _same_tensors(mine, theirs)
    assert ckpt.manifest.step == 2 and ckpt.manifest.progress.records == _progress(2).records
    resumed = restore_rng(ckpt.manifest.progress.rng)
    assert [resumed.random() for _ in range(5)] == expected_next

    fresh = AdapterStore.create("t", LORA, OptimConfig(lr=1e-3), SHAPES)
    assert fresh.load_state(state) == 5
    assert state_digest(fresh.export_state()) == ckpt.manifest.state_digest == state_digest(store.export_state())


def test_a_new_checkpoint_replaces_the_old_one_and_leaves_no_temp_files(tmp_path, base):
    folder = tmp_path / "ck"
    write_checkpoint(folder, _trained_store(1).export_state(), _progress(1), base)
    write_checkpoint(folder, _trained_store(2).export_state(), _progress(2), base)
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and MANIFEST_FILE in files, files
    assert read_manifest(folder).tensors_file in files and read_checkpoint(folder).manifest.step == 2


def test_a_crash_before_the_manifest_commit_keeps_the_previous_checkpoint(tmp_path, base, monkeypatch):
    import clora.checkpoint.format as ck

    folder = tmp_path / "ck"
    write_checkpoint(folder, _trained_store(1).export_state(), _progress(1), base)
    real = ck._write_atomically

    def die_on_manifest(path: Path, data: bytes) -> None:
        if path.name == MANIFEST_FILE:
            raise OSError("killed before the commit")
        real(path, data)

    monkeypatch.setattr(ck, "_write_atomically", die_on_manifest)
    with pytest.raises(OSError, match="killed"):
        write_checkpoint(folder, _trained_store(2).export_state(), _progress(2), base)
    monkeypatch.setattr(ck, "_write_atomically", real)
    survivor = read_checkpoint(folder)
    assert survivor.manifest.step == 1
    assert state_digest(survivor.state) == state_digest(_trained_store(1).export_state())
    (folder / ".leftover.safetensors.x.tmp").write_bytes(b"partial")  # a writer killed mid-file
    write_checkpoint(folder, _trained_store(3).export_state(), _progress(3), base)
    assert len(list(folder.iterdir())) == 2 and read_checkpoint(folder).manifest.step == 3


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, **changes}))


def _tensor_file(folder: Path) -> Path:
    return folder / read_manifest(folder).tensors_file


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: _tensor_file(f).write_bytes(_tensor_file(f).read_bytes()[:-100]), "truncated"),
        (lambda f: _tensor_file(f).write_bytes(b"\0" * 8 + _tensor_file(f).read_bytes()[8:]), "SHA-256"),
        (lambda f: _tensor_file(f).unlink(), "missing"),
        (lambda f: (f / MANIFEST_FILE).write_bytes((f / MANIFEST_FILE).read_bytes()[:200]), "corrupt or truncated"),
        (lambda f: _edit_manifest(f, format_version=99), "format_version 99"),
        (lambda f: _edit_manifest(f, format="something.else"), "not a clora checkpoint"),
    ],
    ids=["truncated-tensors", "altered-tensors", "missing-tensors", "truncated-manifest", "newer-format",
         "other-format"],
)
def test_a_damaged_checkpoint_is_a_clear_error_never_loaded(tmp_path, base, damage, message):
    folder = tmp_path / "ck"
    write_checkpoint(folder, _trained_store().export_state(), _progress(1), base)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(folder)


def test_missing_and_removed_checkpoints(tmp_path, base):
    folder = tmp_path / "run" / "tenants" / "t" / "checkpoint"
    assert not has_checkpoint(folder) and checkpoint_steps(tmp_path / "run", ["t"]) == {}
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        read_checkpoint(folder)
    write_checkpoint(folder, _trained_store().export_state(), _progress(3), base)
    assert checkpoint_steps(tmp_path / "run", ["t", "other"]) == {"t": 3}
    assert remove_checkpoint(folder) and not has_checkpoint(folder) and list(folder.iterdir()) == []


def test_base_model_identity_sees_config_and_weights_but_not_the_folder_name(tmp_path):
    a = base_model_identity(_fake_model(tmp_path / "a"))
    renamed = base_model_identity(_fake_model(tmp_path / "renamed"))
    other_weights = base_model_identity(_fake_model(tmp_path / "w", weights=b"v" * 4096))
    bigger = base_model_identity(_fake_model(tmp_path / "big", hidden=32))
    assert msgspec.structs.replace(renamed, name="a") == a
    assert other_weights.config_sha256 == a.config_sha256 and other_weights.weights_fingerprint != a.weights_fingerprint
    assert bigger.hidden_size == 32 and bigger.config_sha256 != a.config_sha256


def test_tiny_models_of_different_seeds_have_different_identities(tiny_model_dir, tmp_path):
    from clora.models import tiny_llama

    ours = base_model_identity(tiny_model_dir)
    other = base_model_identity(tiny_llama(tmp_path / "seed1", seed=1))
    assert (ours.model_type, ours.num_layers) == ("llama", other.num_layers)
    assert ours.weights_fingerprint != other.weights_fingerprint


@pytest.mark.parametrize(
    ("other_base", "lora", "message"),
    [
        ({"hidden": 32}, LORA, r"base model mismatch \(hidden_size\)"),
        ({"weights": b"v" * 4096}, LORA, r"base model mismatch \(weights_fingerprint\)"),
        ({}, msgspec.structs.replace(LORA, rank=8), "rank mismatch: checkpoint rank 4, tenant rank 8"),
        ({}, msgspec.structs.replace(LORA, alpha=4.0), "alpha mismatch"),
        ({}, msgspec.structs.replace(LORA, target_modules=("q_proj",)), "target modules mismatch"),
    ],
    ids=["other-base-model", "same-config-other-weights", "rank", "alpha", "targets"],
)
def test_a_checkpoint_for_another_base_or_adapter_shape_names_the_mismatch(tmp_path, base, other_base, lora, message):
    folder = tmp_path / "ck"
    write_checkpoint(folder, _trained_store().export_state(), _progress(1), base)
    ours = base_model_identity(_fake_model(tmp_path / "ours", **other_base)) if other_base else base
    with pytest.raises(AdapterMismatchError, match=message):
        check_compatible(read_manifest(folder), ours, lora, where="checkpoint of 't'")
    check_compatible(read_manifest(folder), base, LORA, where="same")  # the right pair passes


def test_load_state_refuses_another_shape_before_writing_anything():
    store = _trained_store()
    before = state_digest(store.export_state())
    other = AdapterStore.create("t", msgspec.structs.replace(LORA, rank=8), OptimConfig(), SHAPES)
    with pytest.raises(AdapterMismatchError, match="rank/alpha mismatch"):
        store.load_state(other.export_state())
    fewer = AdapterStore.create("t", LORA, OptimConfig(), {k: v for k, v in SHAPES.items() if "q_proj" in k})
    with pytest.raises(AdapterMismatchError, match="missing"):
        store.load_state(fewer.export_state())
    assert state_digest(store.export_state()) == before and store.step == 5


def test_checkpoint_every_must_not_be_negative():
    from clora.config import ExperimentConfig
    from clora.errors import ConfigError

    assert ExperimentConfig(name="t").checkpoint_every == 1 and ExperimentConfig(name="t", checkpoint_every=0)
    with pytest.raises(ConfigError, match="experiments.t.checkpoint_every: must be >= 0"):
        ExperimentConfig(name="t", checkpoint_every=-1)
