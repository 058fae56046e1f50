"""`clora serve` driven by the official `tinker` SDK: a real server (runtime on the tiny model,
FakeEngine, uvicorn on a loopback port) and an unmodified client."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

pytest.importorskip("tinker")
import tinker  # noqa: E402
from tinker import types  # noqa: E402

from clora.config import ModelConfig, RuntimeConfig  # noqa: E402
from clora.messages import Completion, ExportStoreState  # noqa: E402
from clora.serve import KeyRing  # noqa: E402
from clora.testing import FakeEngine  # noqa: E402
from clora.testing.serve import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.timeout(600)

ADMIN, ALICE, BOB = "tml-admin-secret", "tml-alice-secret", "tml-bob-secret"
KEYS = {"keys": [{"name": "admin", "key": ADMIN, "admin": True},
                 {"name": "alice", "key": ALICE, "tenants": ["alice-math"]},
                 {"name": "bob", "key": BOB}]}
TOKENS = [5, 6, 7, 8, 9, 10, 11]


def _reply(request) -> Completion:
    tokens = [100 + (request.index + i) % 40 for i in range(3)]
    return Completion(token_ids=tokens, logprobs=[-0.5] * 3, text="abc", finish_reason="stop")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)),
                           run_dir=str(tmp_path_factory.mktemp("serve-run")))
    engine = FakeEngine(_reply)
    with serve_in_thread(config, engine=engine, keys=KeyRing.parse(json.dumps(KEYS), "test"),
                         base_model_name="tiny", max_body_bytes=64 * 1024) as s:
        s.engine = engine
        yield s


def _client(served, key: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=served.url, api_key=key)


def _state(served, tenant: str):
    return served.call(lambda rt: rt.ask(ExportStoreState(tenant=tenant)))


def _datum(weights=None, **inputs) -> types.Datum:
    n = len(TOKENS) - 1
    loss_inputs = {"target_tokens": TOKENS[1:], **inputs}
    if weights is not None:
        loss_inputs["weights"] = weights
    assert all(len(v) == n for v in loss_inputs.values())
    return types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]), loss_fn_inputs=loss_inputs)


def test_health_and_capabilities_name_the_served_model(served):
    assert httpx.get(f"{served.url}/api/v1/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{served.url}/readyz").json()["status"] == "ready"
    response = httpx.get(f"{served.url}/api/v1/get_server_capabilities", headers={"X-Api-Key": ADMIN}).json()
    assert response["supported_models"][0]["model_name"] == "tiny"
    session = _post(served, "create_session", ADMIN, {"tags": [], "user_metadata": None, "sdk_version": "x"}).json()
    assert _post(served, "session_heartbeat", ADMIN, {"session_id": session["session_id"]}).status_code == 200
    assert _post(served, "session_heartbeat", BOB, {"session_id": session["session_id"]}).status_code == 404


def test_a_service_client_used_as_a_context_manager_finishes_its_session(served):
    # tinker-cookbook's RL loop uses `with tinker.ServiceClient(...)`; closing it finishes the session
    with _client(served, ALICE) as service:
        tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
        session_id = service.holder.get_session_id()
        assert _post(served, "session_heartbeat", ALICE, {"session_id": session_id}).status_code == 200
    assert _post(served, "session_heartbeat", ALICE, {"session_id": session_id}).status_code == 404
    assert _post(served, f"sessions/{session_id}/finish", ALICE, {}).status_code == 404
    assert tc.model_id in served.server.state.tenants  # the tenant outlives the session
    # the server logs through the runtime's logger, into the runtime's events
    logged = [json.loads(line) for line in (served.runtime.run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "serve.tenant_created" and e["tenant"] == tc.model_id for e in logged)


def test_the_runtime_logger_exists_only_while_the_runtime_runs():
    from clora.runtime import Runtime

    with pytest.raises(RuntimeError, match="not started"):
        Runtime().log


def test_cross_entropy_step_sample_and_logprobs_through_the_sdk(served):
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    name = tc.model_id
    weights = [0.0, 0.0, 1.0, 1.0, 0.5, 1.0]
    out = tc.forward_backward([_datum(weights)], "cross_entropy").result()
    logprobs = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(logprobs) == len(TOKENS) - 1 and all(lp < 0 for lp in logprobs)
    # Tinker's cross-entropy is the weighted sum of the targets' negative log-probs
    assert out.metrics["loss:sum"] == pytest.approx(-sum(w * lp for w, lp in zip(weights, logprobs)), rel=1e-4)
    before = _state(served, name)
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = _state(served, name)
    assert after.version == before.version + 1 == int(step.metrics["version"])
    # Adam's first step moves every weight with a gradient by exactly lr (no clipping: grad_clip_norm 0)
    delta = max(float((after.params[k] - before.params[k]).abs().max()) for k in before.params)
    assert delta == pytest.approx(1e-2, rel=1e-3)
    sampler = tc.save_weights_and_get_sampling_client(name="step1")
    result = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), num_samples=2,
                            sampling_params=types.SamplingParams(max_tokens=3, temperature=0.5)).result()
    assert len(result.sequences) == 2 and all(len(s.tokens) == 3 for s in result.sequences)
    request = served.engine.requests[-1]
    assert (request.tenant, request.version, request.prompt_token_ids) == (name, after.version, [1, 2, 3])
    assert request.sampling.temperature == 0.5
    prompt_lps = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()
    assert prompt_lps[0] is None and len(prompt_lps) == len(TOKENS)
    again = tc.forward_backward([_datum(weights)], "cross_entropy").result()  # same weights: same log-probs
    assert np.allclose(prompt_lps[1:], again.loss_fn_outputs[0]["logprobs"].tolist(), atol=1e-5)


def test_importance_sampling_loss_is_tinkers_sum(served):
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    advantages = [0.0, 0.0, 1.0, -0.5, 2.0, 0.0]
    sampler_lps = [0.0, 0.0, -2.0, -3.0, -1.5, 0.0]
    out = tc.forward_backward([_datum(advantages=advantages, logprobs=sampler_lps)], "importance_sampling").result()
    lps = out.loss_fn_outputs[0]["logprobs"].tolist()
    expected = -sum(math.exp(lp - q) * a for lp, q, a in zip(lps, sampler_lps, advantages))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert "kl_sampler:mean" in out.metrics and "ratio_mean:mean" in out.metrics
    # a group that scored the same everywhere (all advantages 0) is a zero gradient, not an error: a fresh
    # client's first Adam step then moves nothing
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    before = _state(served, tc.model_id)
    no_signal = tc.forward_backward([_datum(advantages=[0.0] * 6, logprobs=sampler_lps)],
                                    "importance_sampling").result()
    # every target was trained (with zero gradient), prompt targets whose sampler log-probs the client sent as
    # 0 included: comparisons with the sampler would be noise, so the call reports none
    assert not {"kl_sampler:mean", "ratio_mean:mean", "clip_frac:mean"} & set(no_signal.metrics), no_signal.metrics
    assert no_signal.metrics["loss:sum"] == pytest.approx(0.0, abs=1e-6)
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after = _state(served, tc.model_id)
    assert after.version == before.version + 1
    for k, v in before.params.items():
        assert bool((v == after.params[k]).all()), k


def test_save_state_then_load_state_restores_the_weights(served):
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    tc.forward_backward([_datum([1.0] * 6)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved_path = tc.save_state("ck1").result().path
    assert saved_path.startswith(f"tinker://{tc.model_id}/weights/")
    saved = _state(served, tc.model_id)
    tc.forward_backward([_datum([1.0] * 6)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert not all(bool((saved.params[k] == v).all()) for k, v in _state(served, tc.model_id).params.items())
    tc.load_state(saved_path).result()
    loaded = _state(served, tc.model_id)
    for k, v in saved.params.items():
        assert np.allclose(v.numpy(), loaded.params[k].numpy(), atol=1e-6), k
    # the SDK's newer way: a new training client (a new tenant) made from the checkpoint
    fresh = _client(served, ADMIN).create_training_client_from_state(
        saved_path, user_metadata={"clora_tenant": "from-ck1"}).result()
    copied = _state(served, "from-ck1")
    for k, v in saved.params.items():
        assert np.allclose(v.numpy(), copied.params[k].numpy(), atol=1e-6), k
    assert fresh.forward_backward([_datum([1.0] * 6)], "cross_entropy").result().metrics["loss:sum"] > 0


def test_stop_token_ids_reach_the_engine_and_end_the_completion_there(served):
    """The cookbook's chat renderers stop on a token (e.g. <|im_end|>), not on a string."""
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    sampler = tc.save_weights_and_get_sampling_client(name="stops")
    result = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), num_samples=1,
                            sampling_params=types.SamplingParams(max_tokens=3, stop=[101, 7])).result()
    request = served.engine.requests[-1]
    assert request.sampling.stop_token_ids == (101, 7) and request.sampling.stop == ()
    assert len(result.sequences) == 1
    mixed = _post(served, "asample", ADMIN, {"prompt": {"chunks": [{"tokens": [1, 2, 3]}]}, "base_model": "tiny",
                                             "sampling_params": {"max_tokens": 3, "stop": ["x", 7]}})
    assert mixed.status_code == 400 and "stop strings or stop token ids, not both" in mixed.text  # the SDK refuses it too


def test_unsupported_features_fail_naming_them(served):
    tc = _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=4).result()
    with pytest.raises(Exception, match="'dro'"):
        tc.forward_backward([_datum(advantages=[0.0] * 6, logprobs=[0.0] * 6)], "dro").result()
    path = tc.save_state("ck").result().path
    with pytest.raises(Exception, match="optimizer state"):
        tc.load_state_with_optimizer(path).result()
    with pytest.raises(Exception, match="rank 64"):
        _client(served, ADMIN).create_lora_training_client(base_model="tiny", rank=64).result()


# ----------------------------------------------------------------------------- access control

def _post(served, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"X-Api-Key": key} if key else {}
    return httpx.post(f"{served.url}/api/v1/{path}", headers=headers, json=body)


def test_one_key_cannot_reach_another_keys_tenant(served):
    alice = _client(served, ALICE).create_lora_training_client(
        base_model="tiny", rank=4, user_metadata={"clora_tenant": "alice-math"}).result()
    assert alice.model_id == "alice-math"
    before = _state(served, "alice-math")
    bodies = {
        "optim_step": {"model_id": "alice-math", "adam_params": {"learning_rate": 0.1}},
        "save_weights": {"model_id": "alice-math", "path": "stolen"},
        "save_weights_for_sampler": {"model_id": "alice-math", "path": "s"},
        "load_weights": {"model_id": "alice-math", "path": "tinker://x/weights/y", "optimizer": False},
        "unload_model": {"model_id": "alice-math"},
        "get_info": {"model_id": "alice-math"},
        "create_sampling_session": {"session_id": "s", "model_path": "tinker://alice-math/sampler_weights/s"},
        "asample": {"model_path": "tinker://alice-math/sampler_weights/s", "num_samples": 1,
                    "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}},
    }
    for path, body in bodies.items():
        theirs = _post(served, path, BOB, body)
        missing = _post(served, path, BOB, json.loads(json.dumps(body).replace("alice-math", "nobody-here")))
        assert theirs.status_code == 403, (path, theirs.text)
        assert theirs.json() == missing.json(), path  # says nothing about whether the tenant exists
    proto = {"X-Api-Key": BOB, "Content-Type": "application/x-protobuf"}
    theirs = httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto, content=_proto("alice-math"))
    missing = httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto, content=_proto("nobody-here"))
    assert theirs.status_code == 403 and theirs.json() == missing.json()
    bob = _client(served, BOB).create_lora_training_client(base_model="tiny", rank=4).result()
    assert bob.forward_backward([_datum([1.0] * 6)], "cross_entropy").result().metrics["loss:sum"] > 0  # its own
    assert _post(served, "optim_step", None, bodies["optim_step"]).status_code == 403  # no key
    assert _post(served, "optim_step", "tml-wrong-key", bodies["optim_step"]).status_code == 403
    after = _state(served, "alice-math")
    assert after.version == before.version
    for k, v in before.params.items():
        assert bool((v == after.params[k]).all()), k


def _proto(model_id: str, weights=None, tokens=TOKENS) -> bytes:
    from tinker.proto.request_conv import forward_backward_request_to_proto

    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights or [1.0] * (len(tokens) - 1)})
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"), model_id=model_id,
        seq_id=1)
    return forward_backward_request_to_proto(request).SerializeToString()


# ----------------------------------------------------------------------------- bad input

def test_bad_input_gets_one_clear_error_and_leaves_a_bystander_bit_identical(served):
    _client(served, ADMIN).create_lora_training_client(
        base_model="tiny", rank=4, user_metadata={"clora_tenant": "bystander"}).result()
    victim = _client(served, ADMIN).create_lora_training_client(
        base_model="tiny", rank=4, user_metadata={"clora_tenant": "victim"}).result()
    before = _state(served, "bystander")
    headers = {"X-Api-Key": ADMIN}
    proto = {**headers, "Content-Type": "application/x-protobuf"}
    cases = [
        (httpx.post(f"{served.url}/api/v1/optim_step", headers=headers, content=b"{not json"), 400, "not valid JSON"),
        (httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto, content=b"\xff\x00garbage"), 400,
         "protobuf"),
        (httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto,
                    content=_proto("victim", weights=[1.0, float("nan"), 1.0, 1.0, 1.0, 1.0])), 400, "NaN"),
        (httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto, content=_proto("no-such-model")), 404,
         "unknown model"),
        (httpx.post(f"{served.url}/api/v1/forward_backward", headers=proto,
                    content=_proto("victim", tokens=list(range(5, 20000)))), 413, "limit"),
        (_post(served, "create_model", ADMIN, {"session_id": "s", "base_model": "gpt-5"}), 404, "unknown base model"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"], response.text
    # a prompt over max_model_len fails in its future, naming the problem
    sampler = victim.save_weights_and_get_sampling_client(name="v")
    with pytest.raises(Exception, match="(?i)prompt"):
        sampler.sample(types.ModelInput.from_ints([1] * 2000), num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=4)).result()
    future = _post(served, "retrieve_future", ADMIN, {"request_id": "req-999999"})
    assert future.status_code == 404
    after = _state(served, "bystander")
    assert after.version == before.version
    for part in ("params", "exp_avg", "exp_avg_sq", "grads"):
        for k, v in getattr(before, part).items():
            assert bool((v == getattr(after, part)[k]).all()), (part, k)
