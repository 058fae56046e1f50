"""The clora command through ``main([...])``: exit codes and one clear message per bad input.

No vLLM here: ``clora run`` gets a fake ``clora.runtime`` module (the CLI imports it lazily), so the
command's own work is tested: validation, progress callbacks, exit codes, the summary at the end.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import msgspec
import pytest

from clora.cli.main import BENCHES, EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from clora.errors import EnvError

ROOT = Path(__file__).resolve().parents[1]

GOOD_TOML = """
run_dir = "{run_dir}"
[model]
source = "tiny"
[[experiments]]
name = "a"
steps = 2
[[experiments]]
name = "b"
steps = 2
"""


@pytest.fixture(autouse=True)
def _quiet_vllm(monkeypatch, keep_structlog_config):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"clora {command}: error: ")
    return lines[0]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for command in ("run", "events", "export", "sample", "bench"):
        assert command in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == EXIT_USAGE
    assert "usage: clora" in capsys.readouterr().err


@pytest.mark.parametrize(
    "toml, names",
    [
        ("[model]\nsourc = 'tiny'\n[[experiments]]\nname = 'a'\n", ["model.sourc: unknown field", "source"]),
        ("[engine]\nmax_loras = 'four'\n[[experiments]]\nname = 'a'\n", ["engine.max_loras: expected int"]),
        ("[[experiments]]\nname = 'a'\nsteps = 0\n", ["experiments[0].steps", "must be >= 1"]),
        ("[[experiments]]\nname = 'a'\n[experiments.lora]\nrank = 64\n", ["lora.rank", "max_lora_rank"]),
        ("[model]\nsource = 'tiny'\n", ["no experiments", "[[experiments]]"]),
        ("[model\n", ["malformed TOML"]),
    ],
)
def test_run_rejects_a_bad_config_with_one_message_naming_file_and_field(tmp_path, capsys, toml, names):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["run", str(path)]) == EXIT_USAGE
    line = _one_error_line(capsys.readouterr().err, "run")
    assert str(path) in line
    for name in names:
        assert name in line


def test_run_of_a_missing_file_names_it(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == EXIT_USAGE
    assert "nope.toml' does not exist" in _one_error_line(capsys.readouterr().err, "run")


def test_run_check_validates_without_starting_anything(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text(GOOD_TOML.format(run_dir=tmp_path / "run"))
    assert main(["run", str(path), "--check"]) == EXIT_OK
    assert "2 experiments (a, b)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# What `--check` used to pass and the real run failed on only after the engine start (exit 1).
PREFLIGHT_FAILURES = {
    "unknown-target": ("[[experiments]]\nname = 'a'\nlora = {{ target_modules = ['q_proj', 'qkv_proj'] }}\n",
                       "experiments.a.lora.target_modules: target module 'qkv_proj' does not exist in the base "
                       "model (its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                       "up_proj, v_proj)"),
    "gsm8k-file": ("[[experiments]]\nname = 'a'\nenv = {{ kind = 'gsm8k', path = '{tmp}/nope.jsonl' }}\n",
                   "experiments.a.env.path: problem file '{tmp}/nope.jsonl' does not exist"),
    "model-dir": ("[[experiments]]\nname = 'a'\n", "model directory '{tmp}/no-model' does not exist"),
    "rank-too-big": ("[[experiments]]\nname = 'a'\nlora = {{ rank = 16, alpha = 32.0 }}\n",
                     "experiments.a.lora.target_modules: rank 16 is larger than"),
}


def _preflight_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    body, message = PREFLIGHT_FAILURES[case]
    model = {"model-dir": f"{tmp_path}/no-model", "rank-too-big": "tiny-narrow"}.get(case, "tiny")
    if model == "tiny-narrow":  # a model folder whose layers are narrower than the rank
        model = str(_narrow_model(tmp_path / "narrow"))
    path = tmp_path / "bad.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\nsource = "{model}"\n' + body.format(tmp=tmp_path))
    return path, message.format(tmp=tmp_path)


def _narrow_model(folder: Path) -> Path:
    """A model folder (config, tokenizer, safetensors header) whose linear layers are 8 wide."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32,
        "max_position_embeddings": 1024, "tie_word_embeddings": True}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("case", sorted(PREFLIGHT_FAILURES))
def test_run_check_catches_what_would_fail_after_the_engine_start(tmp_path, capsys, monkeypatch, case,
                                                                   hand_made_run):
    path, message = _preflight_case(tmp_path, case)
    assert main(["run", str(path), "--check"]) == EXIT_USAGE
    line = _one_error_line(capsys.readouterr().err, "run")
    assert line.startswith(f"clora run: error: {path}: {message}"), line
    # The real run refuses it the same way before the runtime starts, and leaves no run folder behind.
    seen = {}
    monkeypatch.setitem(sys.modules, "clora.runtime", _fake_runtime_module({}, seen, hand_made_run))
    assert main(["run", str(path)]) == EXIT_USAGE
    assert message in _one_error_line(capsys.readouterr().err, "run")
    assert "entered" not in seen and not (tmp_path / "run").exists()


def test_the_example_experiments_file_is_valid(capsys):
    assert main(["run", str(ROOT / "examples" / "experiments.toml"), "--check"]) == EXIT_OK


class _Record(msgspec.Struct, frozen=True):
    step: int
    adapter_version: int
    reward_mean: float
    trained: bool = True


def _fake_runtime_module(outcomes, seen, hand_made_run):
    """A stand-in for clora.runtime: writes the hand-made events, reports steps, returns ``outcomes``."""

    class Runtime:
        def __init__(self, config, *, run_dir=None, console_level="info"):
            self.config = config
            seen["console_level"] = console_level

        async def __aenter__(self):
            seen["entered"] = True
            return self

        async def __aexit__(self, *exc):
            seen["exited"] = exc[0]
            return None

        async def run_many(self, experiments, on_step=None):
            for e in experiments:
                for step in range(1, e.steps + 1):
                    on_step(e.name, _Record(step=step, adapter_version=step, reward_mean=0.5))
                    seen.setdefault("steps", []).append((e.name, step))
            hand_made_run.write(Path(self.config.run_dir), hand_made_run.run)
            return outcomes

    module = types.ModuleType("clora.runtime")
    module.Runtime = Runtime
    return module


def test_run_drives_every_tenant_and_prints_the_summary(tmp_path, capsys, monkeypatch, hand_made_run):
    seen = {}
    fake = _fake_runtime_module({"a": object(), "b": object()}, seen, hand_made_run)
    monkeypatch.setitem(sys.modules, "clora.runtime", fake)
    path = tmp_path / "ok.toml"
    path.write_text(GOOD_TOML.format(run_dir=tmp_path / "run"))
    assert main(["run", str(path)]) == EXIT_OK
    assert seen["steps"] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert seen["exited"] is None and seen["console_level"] == "warning"
    out = capsys.readouterr().out
    assert "finished" in out and "0.25→0.00" in out  # the summary table of the run's events
    assert (tmp_path / "run" / "config.toml").read_text().count("[[experiments]]") == 2


def test_run_exits_1_when_a_tenant_failed(tmp_path, capsys, monkeypatch, hand_made_run):
    seen = {}
    outcomes = {"a": object(), "b": EnvError("boom")}  # the hand-made run's events say b failed with EnvError: boom
    monkeypatch.setitem(sys.modules, "clora.runtime", _fake_runtime_module(outcomes, seen, hand_made_run))
    path = tmp_path / "ok.toml"
    path.write_text(GOOD_TOML.format(run_dir=tmp_path / "run"))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "other")]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert out.count("boom") == 1 and "b failed: EnvError: boom" in out  # each failure printed once
    assert (tmp_path / "other" / "events.jsonl").is_file()  # --run-dir overrides the file's run_dir


def test_events_summary_as_json_has_the_hand_computed_numbers(tmp_path, capsys, hand_made_run):
    run = hand_made_run.write(tmp_path / "run")
    assert main(["events", str(run), "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [r["tenant"] for r in rows] == ["a", "b"]  # the older run in the file is left out
    assert rows[1]["time_waiting_s"] == pytest.approx(2.0) and rows[1]["status"] == "failed"
    assert main(["events", str(run), "--json", "--all-runs"]) == EXIT_OK
    assert [r["tenant"] for r in json.loads(capsys.readouterr().out.splitlines()[0])] == ["old", "a", "b"]


def test_events_prints_what_the_engine_did_when_the_run_logged_it(tmp_path, capsys, hand_made_run):
    run = hand_made_run.write(tmp_path / "run")
    assert main(["events", str(run)]) == EXIT_OK
    assert "prefix cache" not in capsys.readouterr().out  # a run without engine statistics: no engine line
    totals = {"ts": 1021.0, "level": "info", "event": "sampler.engine_totals", "prompt_tokens": 2000,
              "prompt_tokens_computed": 500, "prompt_tokens_cached": 1500, "generation_tokens": 300,
              "decode_steps": 40, "decode_rows": 240, "decode_batch_mean": 6.0, "decode_batch_max": 12, "busy_s": 9.0}
    hand_made_run.write(tmp_path / "run", [*hand_made_run.run, totals])
    assert main(["events", str(run)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap the line
    assert "2,000 prompt tokens (500 computed, 1,500 from the prefix cache = 75%)" in out
    assert "decode batch mean 6.0 (max 12)" in out


def test_events_draws_timeline_and_curves(tmp_path, capsys, hand_made_run):
    run = hand_made_run.write(tmp_path / "run")
    code = main(["events", str(run), "--timeline", str(tmp_path / "t.png"), "--curves", str(tmp_path / "c.png")])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "22 spans" in out and "7 points" in out
    assert (tmp_path / "t.png").stat().st_size > 20_000 and (tmp_path / "c.png").stat().st_size > 20_000


def test_events_of_a_folder_without_events(tmp_path, capsys):
    assert main(["events", str(tmp_path)]) == EXIT_USAGE
    assert "no events file" in _one_error_line(capsys.readouterr().err, "events")


def test_tensorboard_without_a_writer_says_what_to_install(tmp_path, capsys, hand_made_run):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    run = hand_made_run.write(tmp_path / "run")
    assert main(["events", str(run), "--tensorboard", str(tmp_path / "tb")]) == EXIT_USAGE
    assert "pip install tensorboard" in capsys.readouterr().err


def _adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    header = json.dumps({"base_model.model.q_proj.lora_A.weight": {"dtype": "F32", "shape": [1],
                                                                   "data_offsets": [0, 4]}}).encode()
    (path / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return path


def test_export_copies_a_tenant_adapter(tmp_path, capsys):
    _adapter(tmp_path / "run" / "tenants" / "a" / "adapter")
    assert main(["export", str(tmp_path / "run"), "a", str(tmp_path / "out")]) == EXIT_OK
    assert "rank 4" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "setup, tenant, message",
    [
        (lambda run: None, "a", "does not exist"),
        (lambda run: _adapter(run / "tenants" / "b" / "adapter"), "a", "no tenant 'a' (tenants with a folder: b)"),
        (lambda run: (run / "tenants" / "a").mkdir(parents=True), "a", "has no adapter"),
        (lambda run: (_adapter(run / "tenants" / "a" / "adapter") / "adapter_config.json").unlink(), "a",
         "adapter_config.json is missing"),
    ],
)
def test_export_errors_name_what_is_missing(tmp_path, capsys, setup, tenant, message):
    run = tmp_path / "run"
    if message != "does not exist":
        run.mkdir()
        setup(run)
    assert main(["export", str(run), tenant, str(tmp_path / "out")]) == EXIT_USAGE
    assert message in _one_error_line(capsys.readouterr().err, "export")
    assert not (tmp_path / "out").exists()


def test_sample_checks_the_adapter_before_starting_a_runtime(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "clora.runtime", None)  # importing it would fail the test
    assert main(["sample", str(tmp_path / "missing"), "hi"]) == EXIT_USAGE
    assert "does not exist" in _one_error_line(capsys.readouterr().err, "sample")
    assert main(["sample", str(_adapter(tmp_path / "ad"))]) == EXIT_USAGE
    assert "at least one prompt" in _one_error_line(capsys.readouterr().err, "sample")


def test_a_registered_bench_without_its_module_is_not_yet_available(capsys, monkeypatch):
    assert {"concurrency", "trainer"} <= set(BENCHES)
    monkeypatch.setitem(BENCHES, "later", BENCHES["trainer"]._replace(module="clora.bench_not_written_yet"))
    assert main(["bench", "later", "--quick"]) == EXIT_USAGE
    assert "not yet available" in _one_error_line(capsys.readouterr().err, "bench")
    assert main(["bench", "nope"]) == EXIT_USAGE
    assert "unknown benchmark 'nope'" in _one_error_line(capsys.readouterr().err, "bench")
    assert main(["bench", "concurrency", "--lr", "fast"]) == EXIT_USAGE  # a bad value the benchmark checks itself
    assert "--lr: give positive numbers" in _one_error_line(capsys.readouterr().err, "bench concurrency")


def test_a_registered_bench_module_gets_its_arguments(monkeypatch):
    module = types.ModuleType("clora_test_bench")
    module.main = lambda argv: 7 if argv == ["--quick", "-n", "2"] else None
    monkeypatch.setitem(sys.modules, "clora_test_bench", module)
    monkeypatch.setitem(BENCHES, "fake", BENCHES["trainer"]._replace(module="clora_test_bench"))
    assert main(["bench", "fake", "--quick", "-n", "2"]) == 7
    assert main(["bench", "fake"]) == EXIT_OK  # main returning None means success


def test_a_bench_whose_argparse_exits_returns_that_code_under_its_own_name(monkeypatch, capsys):
    import argparse

    def bench_main(argv):
        argparse.ArgumentParser().parse_args(argv)  # prog comes from sys.argv[0]

    module = types.ModuleType("clora_test_bench2")
    module.main = bench_main
    monkeypatch.setitem(sys.modules, "clora_test_bench2", module)
    monkeypatch.setitem(BENCHES, "fake2", BENCHES["trainer"]._replace(module="clora_test_bench2"))
    before = sys.argv[0]
    assert main(["bench", "fake2", "--bogus"]) == EXIT_USAGE
    assert "usage: clora bench fake2" in capsys.readouterr().err
    assert sys.argv[0] == before


def test_run_resume_counts_the_whole_run(tmp_path, capsys, monkeypatch, hand_made_run, resumed_run):
    """After --resume the bar ends at 6/6 and the summary says 6 steps for a 6-step run, not 2."""
    import clora.checkpoint.format

    seen = {}
    module = _fake_runtime_module({"a": object()}, seen, hand_made_run)

    class Resumed(module.Runtime):
        def __init__(self, config, *, console_level="info", resume=False):
            super().__init__(config, console_level=console_level)
            seen["resume"] = resume

        async def run_many(self, experiments, on_step=None):
            for step in (5, 6):
                on_step("a", _Record(step=step, adapter_version=step, reward_mean=0.5))
            hand_made_run.write(Path(self.config.run_dir), resumed_run("sigkill"))
            return {"a": object()}

    module.Runtime = Resumed
    monkeypatch.setitem(sys.modules, "clora.runtime", module)
    monkeypatch.setattr(clora.checkpoint.format, "checkpoint_steps", lambda run_dir, names: {"a": 4})
    path = tmp_path / "ok.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\nsource = "tiny"\n[[experiments]]\nname = "a"\nsteps = 6\n')
    assert main(["run", str(path), "--resume"]) == EXIT_OK
    out = capsys.readouterr().out
    assert seen["resume"] is True and "resuming: a (step 4/6)" in out
    assert re.search(r"step 6 .* 6/6 ", out)  # the bar counts from the checkpoint, not from 0
    assert re.search(r"\ba +finished +6 +0 +0\.10→0\.60", out), out  # both runs' steps, each once


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-n", "0"], "-n: must be >= 1 (completions per prompt), got 0"),
        (["--temperature", "-1"], "--temperature: must be in [0, 2] (0 is greedy), got -1.0"),
        (["--max-tokens", "2000"], "--max-tokens 2000 leaves no room for a prompt in --max-model-len 1024"),
    ],
)
def test_sample_refuses_bad_sampling_options_before_starting_a_runtime(capsys, monkeypatch, options, message):
    monkeypatch.setitem(sys.modules, "clora.runtime", None)  # importing it would fail the test
    assert main(["sample", "--base", *options, "What is 2+3?"]) == EXIT_USAGE
    assert _one_error_line(capsys.readouterr().err, "sample") == f"clora sample: error: {message}"


def test_python_dash_m_clora_is_the_clora_command():
    import subprocess

    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "clora", "bench", "nope"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == EXIT_USAGE and "clora bench: error: unknown benchmark 'nope'" in proc.stderr


def test_sample_labels_the_adapter_with_the_version_it_was_trained_to(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """The runtime serves a loaded file as its version 1; the label is the file's own version."""
    cli = sys.modules["clora.cli.main"]
    from clora.config import LoraConfig, OptimConfig, TrainerConfig
    from clora.messages import Completion, SampleResult
    from clora.trainer import TrainerCore

    core = TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig())
    core.add_tenant("t", LoraConfig(rank=4, alpha=8.0), OptimConfig())
    for _ in range(3):
        core.store("t").replace_weights({k: t.clone() for k, t in core.store("t").params.items()})  # new versions
    version = core.store("t").version
    assert version >= 3
    core.export_adapter("t", tmp_path / "adapter")

    served = SampleResult(tenant="sample", adapter_version=1, prompt_token_ids=[1], completions=[
        Completion(token_ids=[2], logprobs=[-1.0], text="42", finish_reason="stop")])
    monkeypatch.setattr(cli, "_sample", lambda args, adapter, prompts, model: [served])
    assert main(["sample", str(tmp_path / "adapter"), "What is 6 times 7?"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"adapter version {version}" in out and "version 1" not in out
