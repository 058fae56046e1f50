"""examples/continual.py on the tiny model with its simulated engine (clora.testing.FakeEngine answering
with a per-version accuracy the example sets): served conversations, late out-of-order feedback, the
learner, a gated promotion, a bad version promoted by hand and rolled back, the plot. Minutes under load:
marked slow (``make test-all``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from clora import events as names
from clora.config import EngineConfig, ModelConfig, RuntimeConfig
from clora.runtime import Runtime
from clora.testing import Events, FakeEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continual.py"


def _example():
    spec = importlib.util.spec_from_file_location("continual_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_the_continual_example_promotes_through_the_gate_and_rolls_back_a_bad_version(tiny_model_dir, tmp_path):
    example = _example()
    model = example.SimulatedModel(seed=0)
    run = tmp_path / "run"
    config = RuntimeConfig(model=ModelConfig(source=str(tiny_model_dir)), engine=EngineConfig(max_loras=4),
                           run_dir=str(run))
    lines: list[str] = []
    async with Runtime(config, console_level="critical", engine=FakeEngine(model.script)) as rt:
        report = await example.run(rt, rounds=7, users=4, gate_every=3, bad_round=5, model=model, log=lines.append)
    assert len(report.rounds) == 7 and report.plot.is_file(), lines
    bad = next(v for v in report.promoted if model.quality.get(v) == 0.0)
    (back,) = [to for v, to in report.rolled_back if v == bad]
    rolled = next(i for i, r in enumerate(report.rounds) if f"v{bad} served" in r.event)
    assert report.rounds[rolled].production == bad and report.rounds[rolled + 1].production == back, lines
    events = Events.from_run(run)
    gated = [e for e in events.named(names.CONTINUAL_PROMOTED, names.CONTINUAL_PROMOTION_REFUSED, tenant="support")
             if e["gate"] is not None]
    assert gated and all(e["score"] is not None and e["baseline"] is not None for e in gated)
    assert events.named(names.CONTINUAL_ROLLED_BACK, tenant="support", version=back, from_version=bad)
    (checkout,) = events.named(names.CONTINUAL_CHECKED_OUT, tenant="support")
    assert checkout["source"] == back
    assert events.named(names.CONTINUAL_LEARNER_STEP, tenant="support")
    assert any(line.startswith("round  1: production v0") for line in lines)
