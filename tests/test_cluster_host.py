"""The cluster layer without Ray (fast, in the default run): the ``[cluster]`` config, the wire codec, and
``ActorHost`` driven in this process (call order, cancellation, errors, events, a crash), which is what
the Ray actor runs. The same paths through a real local Ray cluster: tests/test_cluster_ray.py (marker ``ray``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import msgspec
import pytest

from actors import ActorCrashed, ActorStopped, UnknownMessage
from clora import events as names
from clora.cluster.host import ActorHost
from clora.cluster.wire import Wire, decode, encode, portable_error
from clora.config import ClusterConfig, ModelConfig, PlacementConfig, RuntimeConfig, decode_config, dump_toml
from clora.errors import ConfigError, EngineDeadError, UnknownTenantError
from clora.messages import Completion, GetEngineStats, SampleRequest, SamplingSpec

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- config


def test_a_cluster_table_decodes_and_round_trips_and_bad_values_name_their_field():
    config = decode_config(b'[cluster]\naddress = "10.0.0.5:6379"\nsampler_replicas = 2\n'
                           b'[cluster.trainer_placement]\nnum_gpus = 1\nresources = {trainer_node = 1}\n')
    assert config.cluster.sampler_replicas == 2 and config.cluster.trainer_placement.num_gpus == 1
    assert config.cluster.trainer_placement.resources == {"trainer_node": 1.0}
    assert decode_config(dump_toml(config)) == config
    assert RuntimeConfig().cluster is None  # the default: one process
    for text, field in [
        (b'[cluster]\naddress = "head"\n', "cluster.address"),
        (b'[cluster]\nsampler_replicas = 0\n', "cluster.sampler_replicas"),
        (b'[cluster]\nsampler_replicas = 2\nreplicas_per_tenant = 3\n', "cluster.replicas_per_tenant"),
        (b'[cluster]\nreplicas_per_tenant = 0\n', "cluster.replicas_per_tenant"),
        (b'[cluster]\nbackend = "dask"\n', "cluster.backend"),
        (b'[cluster.sampler_placement]\nnum_cpus = -1\n', "cluster.sampler_placement.num_cpus"),
        (b'[cluster.trainer_placement]\nresources = {x = 0}\n', "cluster.trainer_placement.resources"),
        (b'[cluster]\nstart_timeout_s = 0\n', "cluster.start_timeout_s"),
    ]:
        with pytest.raises(ConfigError, match=f"^invalid config: {field}: "):
            decode_config(text)
    with pytest.raises(ConfigError, match="num_gpus: must be a finite number"):
        ClusterConfig(sampler_placement=PlacementConfig(num_gpus=float("nan")))


def test_import_clora_and_the_runtime_do_not_import_ray():
    code = "import sys, clora, clora.runtime, clora.cli.main; assert 'ray' not in sys.modules, 'ray imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- wire


def test_structs_cross_as_msgpack_bytes_and_tensors_and_errors_as_themselves():
    import torch

    from clora.messages import AdapterSnapshot

    request = SampleRequest(tenant="a", prompt_token_ids=[1, 2], sampling=SamplingSpec(n=2, seed=3))
    wire = encode(request)
    assert isinstance(wire, Wire) and isinstance(wire.data, bytes)
    assert decode(msgspec.msgpack.decode(msgspec.msgpack.encode(wire), type=Wire)) == request
    assert decode(encode([[0.5, -1.0]])) == [[0.5, -1.0]] and decode(encode(None)) is None
    snap = AdapterSnapshot(tenant="a", version=1, tensors={"w": torch.ones(2)}, peft_config={})
    assert encode(snap) is snap  # holds tensors: Ray pickles it
    with pytest.raises(TypeError, match="not a clora message type"):
        decode(Wire("os:system", b"\x90"))
    import pickle

    for error in (ActorStopped("sampler", "is stopped"), ActorCrashed("sampler", EngineDeadError("gone")),
                  UnknownMessage("sampler", int, (SampleRequest,)), UnknownTenantError("t")):
        copy = pickle.loads(pickle.dumps(portable_error(error)))
        assert type(copy) is type(error) and str(copy) == str(error)

    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}{b}")

    assert type(portable_error(Odd(1, 2))) is RuntimeError


# ----------------------------------------------------------------------------- the host, in this process


async def _started_host(tiny_model_dir, engine) -> ActorHost:
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)))
    host = ActorHost("sampler", msgspec.json.encode(config), replica=3, engine=engine)
    await host.start()
    return host


OK = Completion(token_ids=[7], logprobs=[-1.0], text="7", finish_reason="stop")


def _base(prompt: list[int]) -> object:
    return encode(SampleRequest(tenant=None, prompt_token_ids=prompt, sampling=SamplingSpec(max_tokens=2)))


async def test_host_calls_enter_the_mailbox_in_sequence_order_whatever_order_they_arrive_in(tiny_model_dir):
    from clora.testing import FakeEngine

    engine = FakeEngine([OK], read_adapters=False)
    host = await _started_host(tiny_model_dir, engine)
    try:
        late = asyncio.ensure_future(host.call(1, _base([2, 2])))  # arrives first, goes second
        await asyncio.sleep(0.05)
        assert engine.requests == []  # waits for call 0
        first = await host.call(0, _base([1, 1]))
        assert (first[0], (await late)[0]) == ("ok", "ok")
        assert [r.prompt_token_ids for r in engine.requests] == [[1, 1], [2, 2]]
        status, error = await host.call(2, encode(SampleRequest(tenant="nobody", prompt_token_ids=[1])))
        assert status == "error" and isinstance(error, UnknownTenantError)  # the asker's error; the actor goes on
        status, stats = await host.call(3, encode(GetEngineStats()))
        assert status == "ok"
    finally:
        await host.stop()


async def test_host_cancel_withdraws_a_running_call_and_skips_one_not_arrived_yet(tiny_model_dir):
    from clora.testing import FakeEngine

    engine = FakeEngine([OK], read_adapters=False, decode_s=30.0)
    host = await _started_host(tiny_model_dir, engine)
    try:
        running = asyncio.ensure_future(host.call(0, _base([1, 2])))
        await asyncio.sleep(0.2)
        assert engine.num_unfinished_requests() == 1
        host.cancel(0)
        done, _ = await asyncio.wait({running}, timeout=10)  # the engine would decode for 30 s
        assert done and running.result() == ("cancelled", None)
        assert engine.num_unfinished_requests() == 0  # the engine request was aborted, as for a local ask
        host.cancel(1)  # before it arrives
        assert await host.call(1, _base([3])) == ("cancelled", None)
        engine.decode_s = 0.0
        assert (await host.call(2, _base([4])))[0] == "ok"  # the order goes on past the skipped call
        batch, crash = await host.take_events(0)
        got = [msgspec.json.decode(line) for line in batch]
        cancelled = [e for e in got if e["event"] == names.CLUSTER_CALL_CANCELLED]
        assert [e["message"] for e in cancelled] == ["SampleRequest", "SampleRequest"]
        assert all(e["pid"] == os.getpid() and e["replica"] == 3 and e["role"] == "sampler" for e in got)
        assert crash is None
    finally:
        await host.stop()


async def test_a_crash_of_the_hosted_actor_is_reported_with_its_cause(tiny_model_dir):
    from clora.testing import FakeEngine

    engine = FakeEngine([OK], read_adapters=False)
    host = await _started_host(tiny_model_dir, engine)
    engine.kill("test")
    status, error = await host.call(0, _base([1]))
    assert status == "error" and isinstance(error, EngineDeadError)
    for _ in range(100):
        batch, crash = await host.take_events(0.1)
        if crash is not None:
            break
    assert isinstance(crash, ActorCrashed) and isinstance(crash.cause, EngineDeadError)
    await host.stop()


def test_the_cluster_toml_of_docs_scale_out_decodes_as_pasted():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)
    assert blocks
    for block in blocks:
        config = decode_config(block)
        assert config.cluster is not None and config.cluster.trainer_placement.num_gpus == 1


def test_clora_run_cluster_flag_runs_the_same_file_on_a_cluster_and_keeps_its_cluster_table(tmp_path):
    import argparse

    from clora.cli.run import load_run_config

    plain = tmp_path / "plain.toml"
    plain.write_text('[[experiments]]\nname = "a"\n')
    tabled = tmp_path / "tabled.toml"
    tabled.write_text('[cluster]\nsampler_replicas = 2\n[[experiments]]\nname = "a"\n')

    def load(path, cluster):
        return load_run_config(argparse.Namespace(config=str(path), run_dir=None, cluster=cluster))

    assert load(plain, None).cluster is None
    assert load(plain, "local").cluster == ClusterConfig(address="local")
    assert load(tabled, "10.0.0.5:6379").cluster == ClusterConfig(address="10.0.0.5:6379", sampler_replicas=2)
    assert load(plain, None).experiments == load(plain, "local").experiments
    with pytest.raises(ConfigError, match="cluster.address"):
        load(plain, "nowhere")


async def test_the_sampler_inbox_is_the_one_replica_or_a_pool_placing_each_tenant_on_replicas_per_tenant(monkeypatch):
    from clora.cluster import placement, pool

    asked = {}

    async def fake_pool(system, replicas, *, name, replicas_per_tenant):
        asked.update(replicas=list(replicas), name=name, replicas_per_tenant=replicas_per_tenant)
        return "the pool"

    monkeypatch.setattr(pool, "start_sampler_pool", fake_pool)
    assert await placement.sampler_inbox(None, ["only"], replicas_per_tenant=1) == "only"
    assert await placement.sampler_inbox(None, ["a", "b", "c"], replicas_per_tenant=2) == "the pool"
    assert asked == {"replicas": ["a", "b", "c"], "name": "sampler", "replicas_per_tenant": 2}


def test_local_starts_a_ray_instance_of_its_own_and_an_address_joins_that_cluster(monkeypatch):
    """ray.init() without an address would join RAY_ADDRESS or a `ray start` cluster on this machine."""
    from clora.cluster import link
    from clora.config import ClusterConfig

    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs["address"])

        def cluster_resources(self):
            return {"CPU": 2.0}

        def nodes(self):
            return [{"Alive": True}]

    monkeypatch.setattr(link, "_ray", FakeRay)
    assert link.connect(ClusterConfig(backend="ray", address="local")) == (True, {"nodes": 1, "cpus": 2.0, "gpus": 0.0})
    link.connect(ClusterConfig(backend="ray", address="10.0.0.5:6379"))
    assert calls == ["local", "10.0.0.5:6379"]
