"""Scripted tenants (``rt.tenant``) in the tools: their adapter is where ``clora export`` looks, ``clora
events`` shows them finished with their optimizer steps, and the timeline draws their work on their row.

The real Runtime, sampler actor and trainer on the tiny model; the engine is clora.testing.FakeEngine.
"""

from __future__ import annotations

import pytest

import clora.runtime
from clora import events as names
from clora.config import LoraConfig, LossConfig, ModelConfig, RuntimeConfig
from clora.observe import load_run_events, summarize, timeline
from clora.observe.artifacts import export_tenant_adapter
from clora.observe.plots import work_labels
from clora.observe.spans import PUBLISHING, ROLLOUT, TRAINER_ROW, TRAINING, Span, tenant_spans
from clora.rl.rollout import completion_datum
from clora.messages import Completion
from clora.testing import FakeEngine

pytestmark = pytest.mark.timeout(180)


def _completion(request) -> Completion:
    tokens = [100 + (request.index + i) % 40 for i in range(1 + request.index % 3)]  # varies per request
    return Completion(token_ids=tokens, logprobs=[-1.0] * len(tokens), text=str(tokens), finish_reason="stop")


async def test_a_scripted_tenant_is_exported_summarized_and_drawn_like_an_experiment(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), run_dir=str(run))
    engine = FakeEngine(_completion, decode_s=0.005)
    async with clora.runtime.Runtime(config, console_level="critical", engine=engine) as rt:
        script = await rt.tenant("script", lora=LoraConfig(rank=4, alpha=8.0))
        left_open = await rt.tenant("left-open")  # the runtime's exit closes it
        for _ in range(2):
            group = await script.sample([5, 6, 7, 8], n=2, max_tokens=4)
            data = [completion_datum(group.prompt_token_ids, c, advantage=a)
                    for c, a in zip(group.completions, (1.0, -1.0))]
            await script.forward_backward(data, LossConfig(kind="importance_sampling"))
            await script.optim_step()
            await script.publish()
        await script.close()
        await script.close()  # twice is harmless
        await left_open.sample([5, 6], n=1, max_tokens=2)

    for tenant, rank in (("script", 4), ("left-open", 8)):
        info = export_tenant_adapter(run, tenant, tmp_path / "out" / tenant)
        assert info.rank == rank and info.tensors > 0

    events = load_run_events(run)
    closed = {e["tenant"]: e for e in events if e["event"] == names.TENANT_CLOSED}
    assert closed["script"]["adapter_version"] == 2 and closed["left-open"]["adapter_version"] == 0
    rows = {r.tenant: r for r in summarize(events)}
    assert (rows["script"].status, rows["script"].steps, rows["script"].scripted) == ("finished", 2, True)
    assert rows["script"].time_train_s > 0 and rows["script"].versions_published == 3
    assert (rows["left-open"].status, rows["left-open"].steps) == ("finished", 0)

    kinds = {s.kind for s in tenant_spans(events) if s.row == "script"}
    assert {ROLLOUT, TRAINING, PUBLISHING} <= kinds
    info = timeline(events, tmp_path / "t.png")
    assert info.rows[:2] == ["script", "left-open"]


def test_a_tenant_still_running_when_the_runtime_stopped_reads_stopped():
    events = [
        {"ts": 1.0, "event": names.RUNTIME_STARTED, "duration_s": 0.0},
        {"ts": 2.0, "event": names.TENANT_STARTED, "tenant": "a", "steps": 3},
        {"ts": 3.0, "event": names.RUNTIME_STOPPED, "duration_s": 2.0},
    ]
    (row,) = summarize(events)
    assert row.status == "stopped"


def test_back_to_back_trainer_work_of_one_tenant_gets_one_label():
    # a script's forward_backward then optim_step: each too narrow for its name, together wide enough
    spans = [Span(row=TRAINER_ROW, kind=TRAINING, start=0.0, end=0.5, tenant="script"),
             Span(row=TRAINER_ROW, kind=TRAINING, start=0.5, end=1.0, tenant="script"),
             Span(row=TRAINER_ROW, kind=TRAINING, start=5.0, end=5.1, tenant="other")]
    assert work_labels(spans, wall=10.0) == [(TRAINER_ROW, 0.0, 1.0, "script")]
