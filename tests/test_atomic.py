"""Atomic writing (clora.checkpoint.atomic): complete or absent, ordinary file modes, orphans swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clora.checkpoint.atomic import (
    PARTIAL_MARK,
    build_dir_atomically,
    remove_orphans,
    write_atomically,
    write_bytes_atomically,
)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_files_and_folders_get_the_modes_of_ordinary_ones(tmp_path, umask):
    write_bytes_atomically(tmp_path / "a.bin", b"x")
    write_atomically(tmp_path / "b.txt", lambda p: p.write_text("y"), durable=True)
    folder = build_dir_atomically(tmp_path / "d", lambda p: (p / "f").write_text("z"))
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.txt") == 0o666 & ~umask  # not mkstemp's 0600
    assert _mode(folder) == 0o777 & ~umask  # not mkdtemp's 0700


def test_exported_adapter_and_checkpoint_files_are_readable_like_any_file(tmp_path, umask):
    """A user report: adapter files clora exported were mode 0600 (tempfile's private mode)."""
    from clora.checkpoint.format import BaseModelIdentity, TenantProgress, rng_state, write_checkpoint
    from clora.config import LoraConfig, OptimConfig
    from clora.trainer.peft_io import export_peft, peft_config_dict, peft_state_dict
    from clora.trainer.store import AdapterStore

    import random

    lora = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj",))
    store = AdapterStore.create("t", lora, OptimConfig(), {"model.layers.0.self_attn.q_proj": (8, 8)})
    out = export_peft(peft_state_dict(store), peft_config_dict(lora, None), tmp_path / "adapter")
    base = BaseModelIdentity(name="m", model_type="llama", hidden_size=8, num_layers=1, vocab_size=10,
                             config_sha256="0", weights_fingerprint="0")
    progress = TenantProgress(step=0, rng=rng_state(random.Random(0)), accuracy_start=0.0, started_at=0.0,
                              tokens_sampled=0, records=[])
    manifest, _ = write_checkpoint(tmp_path / "ck", store.export_state(), progress, base)
    files = [*out.iterdir(), *manifest.parent.iterdir()]
    assert len(files) == 4
    assert {f.name: _mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "f"
    write_bytes_atomically(target, b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_folder_build_replaces_only_when_asked(tmp_path):
    target = build_dir_atomically(tmp_path / "d", lambda p: (p / "v").write_text("1"))
    build_dir_atomically(target, lambda p: (p / "v").write_text("2"))  # another builder won: kept
    assert (target / "v").read_text() == "1"
    build_dir_atomically(target, lambda p: (p / "v").write_text("3"), replace=True)
    assert (target / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_orphans_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    prefix = f".d{PARTIAL_MARK}"
    for pid in (dead_pid, os.getpid()):
        (tmp_path / f"{prefix}{pid}-abc").mkdir()
    (tmp_path / f"{prefix}x-abc").mkdir()  # not a pid: not ours to judge
    remove_orphans(tmp_path, prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{prefix}{os.getpid()}-abc", f"{prefix}x-abc"])


def test_publish_writes_a_complete_peft_folder_in_place(tmp_path):
    from clora.messages import AdapterSnapshot
    from clora.sampler.sync import _write_atomically

    snap = AdapterSnapshot(tenant="t", version=1, peft_config={"r": 1},
                           tensors={"base_model.model.m.lora_A.weight": torch.zeros(1, 2)})
    size = _write_atomically(snap, tmp_path / "t" / "v1")
    files = sorted((tmp_path / "t" / "v1").iterdir())
    assert [f.name for f in files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert size == sum(f.stat().st_size for f in files) and os.listdir(tmp_path / "t") == ["v1"]
