"""`clora run` and checkpoints on real vLLM (tiny model): Ctrl-C saves the last completed step, then
`clora run` refuses to overwrite it without --resume/--fresh, and `--resume` finishes the run.

Three ``clora run`` processes, two of them starting an engine: marked ``slow`` (``make test-all`` runs it).
Each of its paths stays in the default run, proven by a cheaper test: SIGINT to a real ``clora run``
process exits 130 after the runtime left its context manager (tests/test_cli_subprocess.py); stopping
a run checkpoints each tenant's last completed step (tests/test_checkpoint_tenant.py::
test_stopping_a_run_checkpoints_its_last_completed_step); the refusal without --resume/--fresh and the
flags reaching the runtime (tests/test_resume_guard.py); resuming on the real engine loses no completed
step (tests/test_resume_sigkill.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from clora import events
from clora.checkpoint.format import read_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # Ctrl-C comes once both tenants are past step 2: six steps of margin before the run could end

RUN = """
run_dir = "{run_dir}"
[model]
source = "{model}"
max_model_len = 1024  # the default env's prompt (four worked examples) is ~620 tokens of the tiny tokenizer
[engine]
max_loras = 2
max_lora_rank = 8
max_num_seqs = 32
kv_cache_gib = 1.0
[[experiments]]
name = "a"
steps = {steps}
prompts_per_step = 2
group_size = 2
max_tokens = 8
checkpoint_every = 1000
lora = {{ rank = 8 }}
env = {{ held_out_size = 2, max_turns = 1 }}
[[experiments]]
name = "b"
steps = {steps}
prompts_per_step = 2
group_size = 2
max_tokens = 8
checkpoint_every = 1000
lora = {{ rank = 4, alpha = 8.0 }}
env = {{ held_out_size = 2, max_turns = 1 }}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _ctrl_c_on() -> None:
    """In the child before exec: SIGINT at its default, as a shell starts a command, whatever this
    process inherited (an ignored SIGINT is inherited, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _clora(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clora.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
                            preexec_fn=_ctrl_c_on)


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine processes left in the child's session, if any
        except ProcessLookupError:
            pass


def test_ctrl_c_checkpoints_each_tenant_and_run_resume_completes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(RUN.format(run_dir=run_dir, model=tiny_model_dir, steps=STEPS))

    proc = _clora("run", str(config))
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached step 2"
            done = [e for e in _events(run_dir / "events.jsonl") if e["event"] in (
                events.TENANT_STEP, events.TENANT_STEP_SKIPPED)]
            if {e["tenant"] for e in done if e["step"] >= 2} == {"a", "b"}:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # the process only, as `kill -INT`; the engine is stopped by clora
        out, err = _finish(proc, 120)
    finally:
        if proc.poll() is None:
            _finish(proc, 0.1)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in out

    interrupted = _events(run_dir / "events.jsonl")
    saved = {}
    for tenant in ("a", "b"):
        last_done = max(e["step"] for e in interrupted if e.get("tenant") == tenant and e["event"] in (
            events.TENANT_STEP, events.TENANT_STEP_SKIPPED))
        written = [e["step"] for e in interrupted if e["event"] == events.CHECKPOINT_WRITTEN and e["tenant"] == tenant]
        assert written[0] == 0 and written[-1] == last_done < STEPS, "the last completed step is saved on Ctrl-C"
        saved[tenant] = read_checkpoint(run_dir / "tenants" / tenant / "checkpoint").manifest.step
        assert saved[tenant] == last_done

    refused = _clora("run", str(config))
    out, err = _finish(refused, 120)
    assert refused.returncode == 2 and "--resume" in err and "a (step" in err, err

    resumed = _clora("run", str(config), "--resume")
    out, err = _finish(resumed, 600)
    assert resumed.returncode == 0, err[-3000:]
    after = _events(run_dir / "events.jsonl")[len(interrupted):]
    for tenant in ("a", "b"):
        (event,) = [e for e in after if e["event"] == events.CHECKPOINT_RESUMED and e["tenant"] == tenant]
        assert event["step"] == saved[tenant]
        steps = [e["step"] for e in after if e.get("tenant") == tenant and e["event"] in (
            events.TENANT_STEP, events.TENANT_STEP_SKIPPED)]
        assert steps == list(range(saved[tenant] + 1, STEPS + 1))
    assert {e["tenant"] for e in after if e["event"] == events.TENANT_FINISHED} == {"a", "b"}
