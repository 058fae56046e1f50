"""Continual learning over HTTP, as an application and its operator would use it: the official `openai`
client chats with ``tenant@alias`` (plain and streamed), httpx sends ``/v1/feedback`` and calls the admin
API (learn, promote, rollback, versions) on a real server with API keys; the engine is the FakeEngine."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from clora.config import EngineConfig, ModelConfig, RuntimeConfig  # noqa: E402
from clora.messages import Completion  # noqa: E402
from clora.serve import KeyRing  # noqa: E402
from clora.testing import FakeEngine  # noqa: E402
from clora.testing.serve import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(600)
ADMIN, APP, OTHER = "tml-admin-secret", "tml-app-secret", "tml-other-secret"
KEYS = {"keys": [{"name": "ops", "key": ADMIN, "admin": True},
                 {"name": "app", "key": APP, "tenants": ["support"]},
                 {"name": "other", "key": OTHER, "tenants": ["elsewhere"]}]}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    def reply(request) -> Completion:  # the text names the engine adapter that served it
        tokens = [30 + (request.version or 0), 40 + request.index % 5]
        return Completion(token_ids=tokens, logprobs=[-0.5, -0.9], text=request.adapter_name or "base",
                          finish_reason="stop")

    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), engine=EngineConfig(max_loras=2),
                           run_dir=str(tmp_path_factory.mktemp("serve-continual")))
    engine = FakeEngine(reply)
    with serve_in_thread(config, engine=engine, base_model_name="tiny", console_level="error",
                         keys=KeyRing.parse(json.dumps(KEYS), "test")) as s:
        created = httpx.post(f"{s.url}/api/v1/create_model", headers={"X-Api-Key": APP}, json={
            "session_id": "s", "base_model": "tiny", "lora_config": {"rank": 4},
            "user_metadata": {"clora_tenant": "support", "clora_continual": json.dumps({"auto": False})}}).json()
        done = httpx.post(f"{s.url}/api/v1/retrieve_future", headers={"X-Api-Key": APP},
                          json={"request_id": created["request_id"]}).json()
        assert done["model_id"] == "support", done
        s.engine = engine
        yield s


def _admin(served, method: str, path: str, key: str | None = ADMIN, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{served.url}/v1/admin/tenants/support/{path}", headers=headers,
                         json=body if method == "POST" else None, timeout=60)


def _feedback(served, payload: dict, key: str = APP) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/feedback", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_feedback_learns_a_candidate_which_is_promoted_then_rolled_back(served):
    app = openai.OpenAI(base_url=f"{served.url}/v1", api_key=APP, max_retries=0)
    chat = app.chat.completions.create(model="support", messages=[{"role": "user", "content": "2+2?"}],
                                       max_tokens=2, n=2)
    assert chat.system_fingerprint == "support@v0"  # a continual tenant's plain name is its production alias
    assert [c.message.content.split("#")[0] for c in chat.choices] == ["support@v0"] * 2
    ids = chat.model_extra["sample_ids"]
    assert len(ids) == 2 and len(set(ids)) == 2

    # one bad id in a batch: 404 naming it, and nothing of the batch is accepted
    bad = _feedback(served, {"model": "support", "feedback": [{"sample_id": ids[0], "reward": 1.0},
                                                              {"sample_id": "smp_nope", "reward": 0.0}]})
    assert bad.status_code == 404 and "smp_nope" in bad.json()["error"]["message"]
    assert _feedback(served, {"model": "support", "sample_id": ids[1]}).status_code == 400  # no reward
    assert _feedback(served, {"model": "support", "sample_id": ids[1], "reward": 0.0}, key=OTHER).status_code == 403
    ok = _feedback(served, {"model": "support", "feedback": [{"sample_id": ids[1], "reward": 0.0},
                                                             {"sample_id": ids[0], "reward": 1.0}]})
    assert ok.status_code == 200, ok.text
    assert [a["seq"] for a in ok.json()["accepted"]] == [0, 1] and ok.json()["pending"] == 2

    learned = _admin(served, "POST", "learn")
    assert learned.status_code == 200, learned.text
    assert learned.json()["version"]["parent"] == 0 and learned.json()["aliases"]["candidate"] == 1
    candidate = app.chat.completions.create(model="support@candidate", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=2)
    assert candidate.system_fingerprint == "support@v1"
    assert candidate.choices[0].message.content.startswith("support@v1#")

    promoted = _admin(served, "POST", "promote", version="candidate")
    assert promoted.status_code == 200 and promoted.json()["promoted"] and promoted.json()["previous"] == 0
    pieces, fingerprints = [], set()
    for chunk in app.chat.completions.create(model="support@production", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=2, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        fingerprints.add(chunk.system_fingerprint)
    assert "".join(pieces) and fingerprints == {"support@v1"}
    assert served.engine.requests[-1].adapter_name.startswith("support@v1#")  # what decoded it

    back = _admin(served, "POST", "rollback", alias="production")
    assert back.status_code == 200 and back.json()["version"] == 0
    after = app.completions.create(model="support", prompt="next request", max_tokens=2)
    assert after.system_fingerprint == "support@v0" and after.choices[0].text.startswith("support@v0#")

    listed = _admin(served, "GET", "versions")
    assert listed.status_code == 200
    assert listed.json()["aliases"] == {"production": 0, "candidate": 1}
    assert [(v["version"], v["parent"], v["feedback"]) for v in listed.json()["versions"]] == [(0, None, []),
                                                                                              (1, 0, [0, 1])]


def test_admin_endpoints_refuse_a_wrong_token_and_bad_requests_get_the_matching_status(served):
    for key in (None, "tml-wrong-secret", APP):  # no key, an unknown key, a tenant's own non-admin key
        for method, path, body in (("GET", "versions", {}), ("POST", "promote", {"version": 0}),
                                   ("POST", "rollback", {}), ("POST", "learn", {})):
            response = _admin(served, method, path, key=key, **body)
            assert response.status_code == 403, (key, path, response.text)
    assert _admin(served, "POST", "promote", version=42).status_code == 404
    assert _admin(served, "POST", "promote", version=0, bogus=1).status_code == 400
    missing = httpx.get(f"{served.url}/v1/admin/tenants/nobody/versions", headers={"Authorization": f"Bearer {ADMIN}"})
    assert missing.status_code == 404
    app = openai.OpenAI(base_url=f"{served.url}/v1", api_key=APP, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no alias 'staging'"):
        app.chat.completions.create(model="support@staging", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    broken = httpx.post(f"{served.url}/v1/feedback", content=b"{not json", headers={"Authorization": f"Bearer {APP}"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "ConfigError"


def test_a_gated_promotion_over_http_scores_both_versions_and_refuses_one_that_is_not_better_by_the_margin(served):
    gate = {"kind": "arithmetic", "difficulty": 1, "held_out_size": 2}
    before = _admin(served, "GET", "versions").json()["aliases"]["production"]
    # The FakeEngine's replies solve nothing: both versions score 0.0, so the candidate is not better by 0.0.
    refused = _admin(served, "POST", "promote", version=1, gate=gate)
    assert refused.status_code == 200, refused.text
    assert refused.json() == {"tenant": "support", "alias": "production", "version": 1, "previous": before,
                              "promoted": False, "gate": "held_out:arithmetic", "score": 0.0, "baseline": 0.0,
                              "margin": 0.0}
    assert _admin(served, "GET", "versions").json()["aliases"]["production"] == before
    # A margin below zero lets an equal score through: the margin reaches the gate.
    passed = _admin(served, "POST", "promote", version=1, gate=gate, margin=-0.5)
    assert passed.status_code == 200 and passed.json()["promoted"] and passed.json()["margin"] == -0.5
    assert _admin(served, "GET", "versions").json()["aliases"]["production"] == 1
    assert _admin(served, "POST", "rollback", alias="production").json()["version"] == before
    # A gate that is not an env config: 400 naming the field, and the alias does not move.
    bad = _admin(served, "POST", "promote", version=1, gate={"kind": "arithmetic", "held_out_size": 0})
    assert bad.status_code == 400 and "held_out_size" in bad.json()["error"]["message"]
    assert _admin(served, "POST", "promote", version=1, gate={"kind": "poetry"}).status_code == 400
    assert _admin(served, "GET", "versions").json()["aliases"]["production"] == before
