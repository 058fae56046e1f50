"""`clora run` with checkpoints in the run folder: refuses to start over silently; --resume / --fresh
reach the Runtime (a stand-in here, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clora.cli.run as cli_run
from clora.checkpoint.format import TenantProgress, base_model_identity, rng_state, write_checkpoint
from clora.cli.main import EXIT_OK, EXIT_USAGE, main
from clora.config import LoraConfig, OptimConfig
from clora.trainer.store import AdapterStore

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("keep_structlog_config")]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[[experiments]]\nname = "a"\nsteps = 5\n'
                    f'[[experiments]]\nname = "b"\nsteps = 5\n')
    return path


def _checkpoint(tmp_path: Path, tenant: str, step: int) -> None:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    import random

    store = AdapterStore.create(tenant, LoraConfig(rank=2, target_modules=("q_proj",)), OptimConfig(), {"q_proj": (8, 8)})
    progress = TenantProgress(step=step, rng=rng_state(random.Random(0)), accuracy_start=0.0, started_at=0.0,
                              tokens_sampled=0, records=[{}] * step)
    write_checkpoint(tmp_path / "run" / "tenants" / tenant / "checkpoint", store.export_state(), progress,
                     base_model_identity(model))


class FakeRuntime:
    """Records how the CLI built it; runs nothing."""

    made: list[dict] = []

    def __init__(self, config, **kwargs) -> None:
        FakeRuntime.made.append(kwargs)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        return None

    async def run_many(self, experiments, on_step=None):
        return {}


@pytest.fixture
def fake_runtime(monkeypatch):
    FakeRuntime.made = []
    monkeypatch.setattr(cli_run, "load_runtime_class", lambda: FakeRuntime)
    monkeypatch.setattr(cli_run, "print_run_summary", lambda console, run_dir: None)
    return FakeRuntime


def test_run_refuses_a_folder_with_checkpoints_and_names_them(tmp_path, capsys, fake_runtime):
    _checkpoint(tmp_path, "b", 3)
    assert main(["run", str(_config(tmp_path))]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "b (step 3/5)" in err and "--resume" in err and "--fresh" in err and "a (step" not in err
    assert fake_runtime.made == []


def test_resume_and_fresh_reach_the_runtime(tmp_path, capsys, fake_runtime):
    _checkpoint(tmp_path, "a", 2)
    assert main(["run", str(_config(tmp_path)), "--resume"]) == EXIT_OK
    assert "resuming: a (step 2/5)" in capsys.readouterr().out
    assert main(["run", str(_config(tmp_path)), "--fresh"]) == EXIT_OK
    assert [m.get("resume", False) for m in fake_runtime.made] == [True, False]


def test_resume_and_fresh_exclude_each_other_and_a_clean_folder_needs_neither(tmp_path, capsys, fake_runtime):
    assert main(["run", str(_config(tmp_path)), "--resume", "--fresh"]) == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["run", str(_config(tmp_path))]) == EXIT_OK and fake_runtime.made == [{"console_level": "warning"}]
