"""`clora serve` as its own process: SIGTERM lets an in-flight request finish, writes every tenant's
adapter and exits 0; the command refuses bad options with exit 2 before starting anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from clora.cli.main import EXIT_USAGE, main

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

# The server of `clora serve` with the scripted engine instead of vLLM (decoding takes 2 s, so a
# request is in flight when SIGTERM arrives); prints its URL when ready.
SERVER = """
import asyncio, sys
from clora.config import ModelConfig, RuntimeConfig
from clora.messages import Completion
from clora.serve import Server
from clora.testing import FakeEngine

model_dir, run_dir = sys.argv[1], sys.argv[2]
engine = FakeEngine(lambda r: Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0], text="ok", finish_reason="stop"),
                    decode_s=2.0)
server = Server(RuntimeConfig(model=ModelConfig(source=model_dir)), port=0, run_dir=run_dir, engine=engine,
                base_model_name="tiny")
asyncio.run(server.serve(lambda s: print(s.url, flush=True)))
print("exited cleanly", flush=True)
"""


def test_sigterm_finishes_in_flight_requests_and_writes_adapters(tiny_model_dir, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        created = httpx.post(f"{url}/api/v1/create_model", json={
            "session_id": "s", "base_model": "tiny", "lora_config": {"rank": 4},
            "user_metadata": {"clora_tenant": "keeper"}}, timeout=60).json()
        assert httpx.post(f"{url}/api/v1/retrieve_future", json={"request_id": created["request_id"]},
                          timeout=60).json()["model_id"] == "keeper"
        answers: list[httpx.Response] = []
        chat = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/chat/completions", json={
            "model": "keeper", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)))
        chat.start()
        time.sleep(0.5)  # the request is decoding (2 s)
        proc.send_signal(signal.SIGTERM)
        chat.join(60)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "exited cleanly" in out
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["choices"][0]["message"]["content"] == "ok"
    assert (tmp_path / "run" / "tenants" / "keeper" / "adapter" / "adapter_config.json").is_file()


def test_help_lists_serve(capsys):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["serve", "no-such.toml"], "does not exist"),
    (["serve", "examples/serve.toml", "--max-body-bytes", "10"], "--max-body-bytes"),
    (["serve", "examples/serve.toml", "--keys", "no-such-keys.json"], "no-such-keys.json"),
])
def test_bad_options_exit_2_naming_the_problem(argv, words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == EXIT_USAGE
    assert words in capsys.readouterr().err


def test_a_bad_keys_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "short"}]}))
    assert main(["serve", "examples/serve.toml", "--keys", str(keys)]) == EXIT_USAGE
    assert "at least 8 characters" in capsys.readouterr().err
