"""The staleness bound where data enter the trainer (clora.trainer.staleness), and the data tags.

Pure screening first, then the TrainerActor on the tiny model: a datum sampled with version v
trains into version u only if u - v <= k, whatever the asker did.
"""

from __future__ import annotations

import msgspec
import pytest
from structlog.testing import capture_logs

from actors import ActorSystem
from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.errors import StaleDataError
from clora.events import TRAINER_STALE_DATA, TRAINER_STEP
from clora.messages import AddTenant, Datum, TrainStep
from clora.testing import make_data
from clora.trainer.actor import TrainerActor
from clora.trainer.staleness import screen

pytestmark = pytest.mark.timeout(120)

LORA = LoraConfig(rank=4, alpha=8.0)
OPTIM = OptimConfig(lr=1e-2)


def _tagged(versions: list[int | None], seed: int = 1) -> list[Datum]:
    data = make_data(len(versions), seed=seed)
    return [msgspec.structs.replace(d, sampler_version=v) for d, v in zip(data, versions, strict=True)]


def test_screen_keeps_data_within_the_bound_and_drops_the_rest():
    msg = TrainStep(tenant="a", data=_tagged([5, 3, 4, 2]), max_staleness=1)
    seen = screen(msg, version=5)
    assert seen.error is None and seen.dropped == (1, 3) and seen.dropped_versions == (3, 2)
    assert [d.sampler_version for d in seen.msg.data] == [5, 4]
    assert seen.staleness == {0: 1, 1: 1}


def test_screen_boundary_is_inclusive_and_k0_is_on_policy():
    assert screen(TrainStep(tenant="a", data=_tagged([3]), max_staleness=2), version=5).dropped == ()
    assert screen(TrainStep(tenant="a", data=_tagged([3]), max_staleness=1), version=5).error is not None
    assert screen(TrainStep(tenant="a", data=_tagged([5, 5]), max_staleness=0), version=5).staleness == {0: 2}


def test_screen_resample_rejects_the_whole_step_and_names_the_stale_data():
    seen = screen(TrainStep(tenant="a", data=_tagged([5, 3]), max_staleness=1, stale_policy="resample"), version=5)
    assert seen.msg is None and isinstance(seen.error, StaleDataError) and seen.error.stale == (1,)


def test_screen_needs_tags_under_a_bound_and_none_without_one():
    with_none = TrainStep(tenant="a", data=_tagged([5, None]), max_staleness=3)
    assert screen(with_none, version=5).error.stale == (1,)
    assert "no sampler_version" in str(screen(with_none, version=5).error)
    future = screen(TrainStep(tenant="a", data=_tagged([6]), max_staleness=3), version=5)
    assert "newer than the trainer's 5" in str(future.error)
    unbounded = screen(TrainStep(tenant="a", data=_tagged([0, None])), version=5)
    assert unbounded.msg is not None and unbounded.dropped == () and unbounded.staleness == {5: 1}


async def test_trainer_drops_stale_data_at_training_time_and_tags_what_it_trained(tiny_model_dir, device):
    with capture_logs() as logs:
        async with ActorSystem("stale") as system:
            ref = await TrainerActor.start_in(system, tiny_model_dir, TrainerConfig(device=str(device)))
            await ref.ask(AddTenant(tenant="a", lora=LORA, optim=OPTIM))
            for _ in range(2):  # version 2
                await ref.ask(TrainStep(tenant="a", data=_tagged([None, None])))
            result = await ref.ask(TrainStep(tenant="a", data=_tagged([2, 1, 0]), loss=LossConfig(), max_staleness=1))
            assert result.metrics.version == 3 and result.dropped == 1 and result.staleness == {0: 1, 1: 1}
            assert result.metrics.values["sequences"] == 2.0  # the dropped datum did not train
            assert result.metrics.values["ratio_mean"] > 0
            with pytest.raises(StaleDataError, match="every datum"):
                await ref.ask(TrainStep(tenant="a", data=_tagged([0, 1]), max_staleness=1))
            with pytest.raises(StaleDataError) as rejected:
                await ref.ask(TrainStep(tenant="a", data=_tagged([3, 1]), max_staleness=1, stale_policy="resample"))
            assert rejected.value.stale == (1,)
            # rejected steps left the store alone: the next step trains version 3 -> 4
            assert (await ref.ask(TrainStep(tenant="a", data=_tagged([3]), max_staleness=0))).metrics.version == 4
    stale = [e for e in logs if e["event"] == TRAINER_STALE_DATA]
    assert [(e["version"], e["stale"], e["of"], e["trained"]) for e in stale] == [
        (2, 1, 3, True), (3, 2, 2, False), (3, 1, 2, False)
    ]
    steps = [e for e in logs if e["event"] == TRAINER_STEP]
    assert [e["staleness"] for e in steps] == [{}, {}, {"0": 1, "1": 1}, {"0": 1}]
    assert [e["stale_dropped"] for e in steps] == [0, 0, 1, 0]
