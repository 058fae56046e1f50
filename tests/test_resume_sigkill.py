"""Crash safety on real vLLM (tiny model): SIGKILL a running runtime, then resume it from its run folder.

Run 1 (a child process in its own session) trains 3 tenants, checkpointing every step; once every
tenant has a checkpoint of step >= 2 on disk the whole process group gets SIGKILL (the vLLM
EngineCore processes too). Run 2 resumes with ``Runtime(resume=True)``. Every tenant must finish all
its steps with at most one step lost, each checkpoint must verify, and the store the resumed trainer
holds must equal the checkpoint file bit for bit (digest computed here from the file itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from clora import events
from clora.checkpoint.format import read_checkpoint, read_manifest
from clora.testing import events_by_start

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TENANTS = ("a", "b", "c")
STEPS = 5  # the kill comes once every tenant has a checkpoint of step >= 2

CHILD = """
import asyncio, json, sys
import clora
from clora.config import EngineConfig, EnvConfig, ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.testing import ToyEnv

async def main(model_dir, run_dir, resume, tenants, steps):
    config = RuntimeConfig(
        model=ModelConfig(source=model_dir, max_model_len=512),
        engine=EngineConfig(max_loras=len(tenants), max_lora_rank=8, max_num_seqs=32, kv_cache_gib=1.0),
        run_dir=run_dir,
    )
    experiments = [
        ExperimentConfig(name=name, lora=LoraConfig(rank=8, alpha=16, init_seed=i), optim=OptimConfig(lr=1e-2),
                         env=EnvConfig(max_turns=1), steps=steps, prompts_per_step=2, group_size=4, max_tokens=12,
                         seed=i, checkpoint_every=1)
        for i, name in enumerate(tenants)
    ]
    async with clora.Runtime(config, resume=resume, console_level="warning") as rt:
        results = await asyncio.gather(*(rt.run(e, env=ToyEnv()) for e in experiments))
    print(json.dumps({r.tenant: {"steps": [s.step for s in r.steps], "resumed_from_step": r.resumed_from_step}
                      for r in results}))

if __name__ == "__main__":
    model_dir, run_dir, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    asyncio.run(main(model_dir, run_dir, resume, sys.argv[4].split(","), int(sys.argv[5])))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _start(script: Path, model_dir: Path, run_dir: Path, mode: str, log: Path) -> subprocess.Popen:
    args = [sys.executable, str(script), str(model_dir), str(run_dir), mode, ",".join(TENANTS), str(STEPS)]
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=out, text=True, env=_env(),
                                start_new_session=True)


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:  # zombies: dead, not reaped
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL the child's whole process group and anything else left in its session (EngineCore)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        time.sleep(0.2)
    assert not _session_processes(sid), "processes of the killed run are still alive"


def _digest_of_file(path: Path) -> str:
    """The checkpoint's tensors hashed straight from the file (names, shapes, raw fp32 bytes, in name order)."""
    digest = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        digest.update(f"{name}:{tuple(tensors[name].shape)}:".encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def _steps_done(run: list[dict], tenant: str) -> list[int]:
    return [e["step"] for e in run if e.get("tenant") == tenant
            and e["event"] in (events.TENANT_STEP, events.TENANT_STEP_SKIPPED)]


def test_sigkill_mid_run_then_resume_loses_at_most_one_step_per_tenant(tiny_model_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"

    first = _start(script, tiny_model_dir, run_dir, "fresh", tmp_path / "first.log")
    sid = first.pid  # start_new_session: the child leads its own session and process group
    try:
        deadline = time.monotonic() + 400
        while True:
            assert first.poll() is None, f"run 1 ended early: {(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint of step >= 2 for every tenant in time"
            runs = events_by_start(run_dir)
            saved = {e["tenant"] for e in (runs[-1] if runs else []) if e["event"] == events.CHECKPOINT_WRITTEN
                     and e["step"] >= 2}
            if saved >= set(TENANTS):
                break
            time.sleep(0.2)
    finally:
        _kill_session(sid)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    (killed,) = events_by_start(run_dir)
    assert not [e for e in killed if e["event"] == events.TENANT_FINISHED], "killed too late: a tenant finished"
    at_kill = {}
    for tenant in TENANTS:
        folder = run_dir / "tenants" / tenant / "checkpoint"
        ckpt = read_checkpoint(folder)  # verifies size, SHA-256 and contents: no corrupt file
        step = ckpt.manifest.step
        logged = max(e["step"] for e in killed if e["event"] == events.CHECKPOINT_WRITTEN and e["tenant"] == tenant)
        assert step in (logged, logged + 1), "the manifest on disk is the last one committed"
        assert max(_steps_done(killed, tenant)) - step <= 1, f"{tenant}: more than one step lost"
        at_kill[tenant] = (step, ckpt.manifest.adapter_version, _digest_of_file(folder / ckpt.manifest.tensors_file))

    second = _start(script, tiny_model_dir, run_dir, "resume", tmp_path / "second.log")
    try:
        out, _ = second.communicate(timeout=600)
    finally:
        _kill_session(second.pid)
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    results = json.loads(out.strip().splitlines()[-1])

    resumed_run = events_by_start(run_dir)[-1]
    for tenant in TENANTS:
        step, version, file_digest = at_kill[tenant]
        (resumed,) = [e for e in resumed_run if e["event"] == events.CHECKPOINT_RESUMED and e["tenant"] == tenant]
        assert (resumed["step"], resumed["adapter_version"]) == (step, version)
        assert resumed["digest"] == file_digest, f"{tenant}: the restored store differs from the checkpoint file"
        assert _steps_done(resumed_run, tenant) == list(range(step + 1, STEPS + 1)), tenant
        assert results[tenant] == {"steps": list(range(1, STEPS + 1)), "resumed_from_step": step}
        folder = run_dir / "tenants" / tenant / "checkpoint"
        assert read_manifest(folder).step == STEPS and read_checkpoint(folder).manifest.step == STEPS
        assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
    assert {e["tenant"] for e in resumed_run if e["event"] == events.TENANT_FINISHED} == set(TENANTS)
