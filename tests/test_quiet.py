"""A library is quiet by default: the Runtime hands only warnings and errors to the app's logging, vLLM
logs errors only, and a bf16 engine loads a bf16 copy of an fp32 model (no per-tensor cast warnings).

The real Runtime, sampler actor and trainer on the tiny model; the engine is clora.testing.FakeEngine.
"""

from __future__ import annotations

import logging
import os

import pytest
import structlog
import torch
from safetensors.torch import load_file

import clora.runtime
from clora.config import ModelConfig, RuntimeConfig
from clora.events import read_events
from clora.observe.console import configure_console_logging
from clora.sampler.engine_weights import engine_model_dir, weight_dtypes
from clora.messages import Completion
from clora.testing import FakeEngine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def default_structlog():
    """structlog as an app that never configured it has it: every event printed to stdout."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


async def test_the_runtime_prints_nothing_of_a_healthy_run_by_default(
    tiny_model_dir, tmp_path, monkeypatch, capsys, default_structlog
):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "")  # recorded, so the test leaves the variable as it found it
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(tmp_path / "run"))
    answer = Completion(token_ids=[100, 101], logprobs=[-1.0, -1.0], text="a b", finish_reason="stop")
    async with clora.runtime.Runtime(config, engine=FakeEngine([answer])) as rt:
        tenant = await rt.tenant("t")
        await tenant.sample([5, 6, 7], n=2, max_tokens=3)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    out = capsys.readouterr().out
    assert "sampler.sample_done" not in out and "runtime.started" not in out, out
    logged = {e["event"] for e in read_events(tmp_path / "run")}
    assert {"sampler.sample_done", "runtime.started", "tenant.closed"} <= logged  # all of it is in the run folder


@pytest.mark.parametrize(("level", "vllm"), [("warning", "ERROR"), ("error", "ERROR"), ("info", "INFO")])
def test_the_cli_shows_vllm_warnings_only_when_asked(monkeypatch, default_structlog, level, vllm):
    for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the variable as it found it
        monkeypatch.delenv(name)
    monkeypatch.setattr(logging.getLogger("vllm"), "handlers", [])
    configure_console_logging(level)
    assert os.environ["VLLM_LOGGING_LEVEL"] == vllm
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == ("ERROR" if vllm == "ERROR" else "INFO")
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "ignore:resource_tracker:UserWarning" in os.environ["PYTHONWARNINGS"]  # for the engine's processes
    # vLLM's import-time warnings (before it configures its logging) go nowhere when it is to log errors only
    assert bool(logging.getLogger("vllm").handlers) == (vllm == "ERROR")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's choice wins
    configure_console_logging(level)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_a_bf16_engine_gets_a_bf16_copy_made_once(tiny_model_dir, tmp_path):
    assert weight_dtypes(tiny_model_dir) == {"F32"}
    assert engine_model_dir(tiny_model_dir, "float32", cache_dir=tmp_path) == tiny_model_dir  # no copy needed
    copy = engine_model_dir(tiny_model_dir, "bfloat16", cache_dir=tmp_path)
    assert copy != tiny_model_dir and copy.parent == tmp_path / "engine"
    assert weight_dtypes(copy) == {"BF16"}
    original, cast = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(copy / "model.safetensors"))
    assert original.keys() == cast.keys()
    assert all(torch.equal(original[k].to(torch.bfloat16), cast[k]) for k in original)  # what vLLM's cast gives
    assert {p.name for p in tiny_model_dir.iterdir()} == {p.name for p in copy.iterdir()}  # tokenizer, config, ...
    mtime = (copy / "model.safetensors").stat().st_mtime_ns
    assert engine_model_dir(tiny_model_dir, "bfloat16", cache_dir=tmp_path) == copy  # reused, not rebuilt
    assert (copy / "model.safetensors").stat().st_mtime_ns == mtime
    assert engine_model_dir(copy, "bfloat16", cache_dir=tmp_path) == copy
