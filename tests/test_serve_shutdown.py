"""`clora serve` shuts down within a bound even when clients died mid-request and the work they left never
finishes: queued futures are dropped, running ones cancelled after ``graceful_s`` (events name them),
``serve.stopped`` is logged, every tenant's adapter is written and the process exits 0.

The never-ending work is scripted: the engine never answers one prompt, so its sample (a running
future) never finishes, and the tenant's ``unload_model`` (which unloads the adapter once the tenant's
in-flight samples finished) never finishes either; a ``save_weights`` queued behind it never starts.
The client polling the sample's future is killed mid-request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clora.serve.futures import CANCEL_WAIT_S

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
GRACEFUL_S = 1.0
STUCK = 77  # the engine never answers a prompt that starts with this token

SERVER = f"""
import asyncio, sys
from clora.config import ModelConfig, RuntimeConfig
from clora.messages import Completion
from clora.serve import Server
from clora.testing import FakeEngine

async def reply(request):
    if request.prompt_token_ids[0] == {STUCK}:
        await asyncio.Event().wait()  # never answers (until cancelled)
    return Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0], text="ok", finish_reason="stop")

server = Server(RuntimeConfig(model=ModelConfig(source=sys.argv[1])), port=0, run_dir=sys.argv[2],
                engine=FakeEngine(reply), base_model_name="tiny", graceful_s={GRACEFUL_S})
asyncio.run(server.serve(lambda s: print(s.url, flush=True)))
print("exited cleanly", flush=True)
"""

# A client that polls a future and is killed while its request is in flight.
POLLER = """
import sys, httpx
print("polling", flush=True)
httpx.post(sys.argv[1] + "/api/v1/retrieve_future", json={"request_id": sys.argv[2]}, timeout=600)
"""


def _post(url: str, route: str, body: dict) -> dict:
    answer = httpx.post(f"{url}/api/v1/{route}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_sigterm_with_dead_clients_and_stuck_work_exits_0_within_a_bound(tiny_model_dir, tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "poller.py").write_text(POLLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, str(tmp_path / "server.py"), str(tiny_model_dir), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    poller = None
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), server.stderr.read()[-3000:]
        created = _post(url, "create_model", {"session_id": "s", "base_model": "tiny", "lora_config": {"rank": 4},
                                              "user_metadata": {"clora_tenant": "keeper"}})
        assert _post(url, "retrieve_future", {"request_id": created["request_id"]})["model_id"] == "keeper"
        sample = _post(url, "asample", {"model_path": "tinker://keeper/sampler_weights/s", "num_samples": 1,
                                        "prompt": {"chunks": [{"tokens": [STUCK, 8, 9]}]},
                                        "sampling_params": {"max_tokens": 2}})["request_id"]
        unload = _post(url, "unload_model", {"model_id": "keeper"})["request_id"]
        queued = _post(url, "save_weights", {"model_id": "keeper", "path": "after"})["request_id"]
        poller = subprocess.Popen([sys.executable, str(tmp_path / "poller.py"), url, sample], stdout=subprocess.PIPE,
                                  text=True, env=env)
        assert poller.stdout.readline().strip() == "polling"
        time.sleep(0.5)  # its retrieve_future is waiting in the server
        poller.kill()  # the client dies mid-request
        poller.wait(30)
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = server.communicate(timeout=60)  # hangs without the bound: TimeoutExpired fails the test
        took = time.monotonic() - started
    finally:
        for p in (server, poller):
            if p is not None and p.poll() is None:
                p.kill()
    assert server.returncode == 0, err[-3000:]
    assert "exited cleanly" in out
    # uvicorn's drain + the futures' bound + cancelled work unwinding: generous, a hang is not
    assert took < 2 * GRACEFUL_S + 2 * CANCEL_WAIT_S + 30, took

    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    (dropped,) = [e for e in events if e["event"] == "serve.futures_dropped"]
    assert [(f["request_id"], f["kind"], f["model"]) for f in dropped["futures"]] == [(queued, "save_weights", "keeper")]
    (cancelled,) = [e for e in events if e["event"] == "serve.futures_cancelled"]
    assert sorted((f["request_id"], f["kind"]) for f in cancelled["futures"]) == sorted(
        [(sample, "asample"), (unload, "unload_model")])
    assert all(f["waiting_in"].startswith("clora.serve.futures:") for f in cancelled["futures"])
    assert cancelled["still_unwinding"] == 0
    assert names.index("serve.futures_cancelled") < names.index("serve.stopped") < names.index("runtime.stopped")
    assert (tmp_path / "run" / "tenants" / "keeper" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "serve" / "weights" / "keeper" / "after").exists()  # dropped: never started


async def test_aclose_lets_running_work_finish_within_the_bound_and_drops_queued_work():
    """In-process: work that finishes within the bound is not cancelled (a trainer step in progress ends);
    work queued behind a stuck one on the same model never starts; stuck work is cancelled at the bound."""
    from clora import events
    from clora.serve.futures import FutureStore
    from clora.testing.events import RecordingLog

    store, seen, ran = FutureStore(), [], []

    async def step() -> str:
        await asyncio.sleep(0.3)
        ran.append("step")
        return "stepped"

    async def stuck() -> None:
        await asyncio.Event().wait()

    async def after() -> None:
        ran.append("after")

    finishing = store.submit("k", "a", step, kind="optim_step")
    stuck_id = store.submit("k", "b", stuck, kind="unload_model")
    queued = store.submit("k", "b", after, kind="save_weights")
    await asyncio.sleep(0)  # the unchained-so-far work starts
    task = (await store.wait(finishing, "k", False, 0.0))
    assert task is None  # still running when the shutdown begins
    entry = store._futures[finishing]
    await asyncio.wait_for(store.aclose(2.0, RecordingLog(seen)), timeout=2.0 + 3 * CANCEL_WAIT_S)
    assert entry.task.result() == "stepped" and ran == ["step"]  # finished, not cancelled; "after" never ran
    by_name = {name: fields for name, fields in seen}
    assert set(by_name) == {events.SERVE_FUTURES_DROPPED, events.SERVE_FUTURES_CANCELLED}
    assert [f["request_id"] for f in by_name[events.SERVE_FUTURES_DROPPED]["futures"]] == [queued]
    assert [f["request_id"] for f in by_name[events.SERVE_FUTURES_CANCELLED]["futures"]] == [stuck_id]
