"""`clora serve`'s OpenAI API driven by the official `openai` client: a real server on a loopback
port (no API keys configured: loopback clients only), tenants created over the Tinker API."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

openai = pytest.importorskip("openai")

from clora.config import ModelConfig, RuntimeConfig  # noqa: E402
from clora.errors import AccessDeniedError  # noqa: E402
from clora.messages import Completion, ExportStoreState  # noqa: E402
from clora.serve import KeyRing  # noqa: E402
from clora.testing import FakeEngine  # noqa: E402
from clora.testing.serve import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(600)
TEXT = "The answer is 42, of course."


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)

    started, aborted = threading.Event(), []

    async def reply(request) -> Completion:
        if request.tenant == "leaver":  # decodes until cancelled: the disconnect test's request
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                aborted.append(request.index)
                raise
        tokens = ids[: request.sampling.max_tokens]
        return Completion(token_ids=tokens, logprobs=[-0.1] * len(tokens), text=tokenizer.decode(tokens),
                          finish_reason="length" if len(tokens) < len(ids) else "stop")

    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)),
                           run_dir=str(tmp_path_factory.mktemp("serve-openai")))
    engine = FakeEngine(reply)
    with serve_in_thread(config, engine=engine, base_model_name="tiny", console_level="error") as s:
        for name in ("alice", "bob", "leaver"):
            created = httpx.post(f"{s.url}/api/v1/create_model", json={
                "session_id": "s", "base_model": "tiny", "lora_config": {"rank": 4},
                "user_metadata": {"clora_tenant": name}}).json()
            done = httpx.post(f"{s.url}/api/v1/retrieve_future", json={"request_id": created["request_id"]}).json()
            assert done["model_id"] == name, done
        s.engine, s.tokenizer, s.started, s.aborted = engine, tokenizer, started, aborted
        yield s


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused-without-keys", max_retries=0)


def test_models_lists_the_base_model_and_the_tenants(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and {"alice", "bob"} <= set(ids)


def test_chat_completion_samples_the_named_tenant(served, client):
    answer = client.chat.completions.create(model="alice", messages=[{"role": "user", "content": "What is 6*7?"}],
                                            max_tokens=32, temperature=0.3)
    assert answer.choices[0].message.content == TEXT and answer.choices[0].finish_reason == "stop"
    request = served.engine.requests[-1]
    assert request.tenant == "alice" and request.sampling.temperature == 0.3
    assert request.prompt_token_ids == served.runtime.renderer.initial([{"role": "user", "content": "What is 6*7?"}])
    assert answer.usage.completion_tokens == len(served.tokenizer.encode(TEXT, add_special_tokens=False))


def test_streamed_chat_pieces_add_up_to_the_completion(served, client):
    stream = client.chat.completions.create(model="bob@0", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=32, stream=True)
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == TEXT and reasons[-1] == "stop" and len(pieces) > 3
    assert served.engine.requests[-1].tenant == "bob"


def test_completions_plain_and_streamed_with_the_base_model(served, client):
    plain = client.completions.create(model="tiny", prompt="2+2=", max_tokens=3)
    assert plain.choices[0].finish_reason == "length"
    assert served.engine.requests[-1].tenant is None and served.engine.requests[-1].sampling.max_tokens == 3
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="alice", prompt=[1, 2, 3],
                                                                          max_tokens=3, stream=True))
    assert streamed == plain.choices[0].text
    assert served.engine.requests[-1].prompt_token_ids == [1, 2, 3]


def test_bad_requests_get_the_openai_errors(client):
    with pytest.raises(openai.NotFoundError, match="unknown model 'carol'"):
        client.chat.completions.create(model="carol", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="version 7 is not serving"):
        client.chat.completions.create(model="alice@7", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="(?i)prompt"):
        client.completions.create(model="alice", prompt=[1] * 1100, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="alice", prompt="x", temperature=-1)


def _send_and_hang_up(url: str, body: dict, started: threading.Event) -> None:
    """A client that sends a request, waits until the engine decodes it, then closes its connection."""
    address = urlparse(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert started.wait(120), "the request never reached the engine"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_disconnects_is_aborted_in_the_engine_and_others_go_on(served, client, stream):
    engine = served.engine
    served.started.clear()
    before = served.call(lambda rt: rt.ask(ExportStoreState(tenant="bob")))
    aborted_before, errors_before = len(served.aborted), served.server.state.errors
    hang_up = threading.Thread(target=_send_and_hang_up, args=(served.url, {
        "model": "leaver", "messages": [{"role": "user", "content": "wait for it"}], "max_tokens": 8,
        "stream": stream}, served.started))
    hang_up.start()
    assert served.started.wait(120)
    # while the leaver's request decodes, another tenant's request is answered in full
    answer = client.chat.completions.create(model="alice", messages=[{"role": "user", "content": "hi"}], max_tokens=32)
    assert answer.choices[0].message.content == TEXT
    hang_up.join(60)
    deadline = time.monotonic() + 60
    while len(served.aborted) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(served.aborted) == aborted_before + 1  # its engine request was cancelled (vLLM: aborted)
    assert engine.requests[served.aborted[-1]].tenant == "leaver"
    while engine.num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished_requests() == 0
    assert served.server.state.errors == errors_before + 1  # logged as serve.request_failed, status 499
    # the server stays healthy: the same tenant and a bystander are served; the bystander is untouched
    assert httpx.get(f"{served.url}/readyz").json()["status"] == "ready"
    streamed = client.chat.completions.create(model="bob", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == TEXT
    after = served.call(lambda rt: rt.ask(ExportStoreState(tenant="bob")))
    assert after.version == before.version
    for part in ("params", "exp_avg", "exp_avg_sq", "grads"):
        for k, v in getattr(before, part).items():
            assert bool((v == getattr(after, part)[k]).all()), (part, k)


def test_without_keys_only_loopback_clients_are_served():
    keys = KeyRing()
    assert keys.authenticate(None, "127.0.0.1").admin
    with pytest.raises(AccessDeniedError, match="only loopback"):
        keys.authenticate("tml-anything", "10.0.0.5")


def test_the_docs_snippets_run_against_a_server(served, doc_snippets, tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    snippets = doc_snippets("docs/serve.md")
    assert len(snippets) == 2  # the Tinker script, then the OpenAI client (which samples the Tinker tenant)
    for i, code in enumerate(snippets, start=1):
        code = re.sub(r'^BASE_URL = ".*"$', f'BASE_URL = "{served.url}"', code, flags=re.M)
        code = re.sub(r'^BASE_MODEL = ".*"$', 'BASE_MODEL = "tiny"', code, flags=re.M)
        path = tmp_path / f"snippet_{i}.py"
        path.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.returncode == 0, f"docs/serve.md python snippet {i}:\n{proc.stderr[-4000:]}"
        if i == 1:
            assert "step 2: reward" in proc.stdout and "saved tinker://even-tokens/weights/final" in proc.stdout
        else:
            assert "even-tokens" in proc.stdout and TEXT in proc.stdout
    assert any(r.tenant == "even-tokens" for r in served.engine.requests)
