"""The scheduling policy on a simulated clock: strict priority, weighted shares, aging, wait bounds."""

from __future__ import annotations

import random

import pytest

from clora import events
from clora.sched import PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, Scheduler
from clora.testing import RecordingLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(**kw):
    clock, seen = Clock(), []
    sched = Scheduler(clock=clock, log=RecordingLog(seen), **kw)
    return sched, clock, seen


def _simulate(sched: Scheduler, clock: Clock, *, tenants: list[str], until: float, slots: int = 1,
              job_s=lambda rng, tenant: rng.uniform(0.5, 1.5), seed: int = 0) -> list[str]:
    """Every tenant always has work (backlogged); ``slots`` servers; returns the grant order."""
    rng = random.Random(seed)
    running: list[tuple[float, str, float]] = []  # (ends at, tenant, seconds)
    order = []
    for t in tenants:
        sched.wait("train", t)
    while clock.now < until:
        while len(running) < slots:
            chosen = sched.pick("train", among=[t for t in tenants if t not in {r[1] for r in running}])
            if not chosen:
                break
            s = job_s(rng, chosen[0])
            running.append((clock.now + s, chosen[0], s))
            order.append(chosen[0])
        running.sort()
        ends, tenant, seconds = running.pop(0)
        clock.now = ends
        sched.charge("train", tenant, seconds)
        sched.wait("train", tenant)  # backlogged: asks again at once
    return order


def test_strict_priority_serves_the_higher_class_first_whatever_its_usage():
    sched, clock, seen = _scheduler(aging_s=1000)
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    sched.set_policy("hi", priority=PRIORITY_INTERACTIVE)
    sched.set_policy("mid")
    sched.wait("train", "bg")
    clock.now = 1
    sched.wait("train", "mid")
    clock.now = 2
    sched.wait("train", "hi")
    sched.charge("train", "hi", 500.0)  # no running grant: only its usage grows (fair share must not matter)
    assert sched.waiting("train") == ["hi", "mid", "bg"]
    assert sched.pick("train") == ["hi"]
    decision = [f for name, f in seen if name == events.SCHEDULER_DECISION][-1]
    assert decision["reason"] == "priority" and [r["tenant"] for r in decision["queue"]] == ["hi", "mid", "bg"]
    assert sched.pick("train", k=2) == ["mid", "bg"]


def test_a_backlogged_high_class_takes_every_grant_until_aging():
    sched, clock, _ = _scheduler(aging_s=10_000)
    sched.set_policy("hi", priority=PRIORITY_INTERACTIVE)
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    order = _simulate(sched, clock, tenants=["hi", "bg"], until=500)
    assert len(order) > 300 and order.count("bg") == 0  # strict: bg waits as long as hi has work


@pytest.mark.parametrize("slots, weights", [
    (1, {"a": 1.0, "b": 2.0, "c": 4.0, "d": 1.0}),
    # several slots (engine LoRA slots): a tenant holds one at a time, so no share may exceed 1 / slots
    (2, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 1.0, "e": 2.0, "f": 3.0}),
])
def test_weighted_shares_within_ten_percent_of_the_weights_over_a_long_run(slots, weights):
    sched, clock, _ = _scheduler(aging_s=10_000)
    for tenant, weight in weights.items():
        sched.set_policy(tenant, weight=weight)
    # job lengths differ by tenant: shares are device-seconds, not grants
    lengths = dict(zip(weights, [2.0, 0.5, 1.0, 0.25, 1.5, 0.75]))
    _simulate(sched, clock, tenants=list(weights), until=2000, slots=slots,
              job_s=lambda rng, t: lengths[t] * rng.uniform(0.5, 1.5))
    used = sched.usage("train")
    total_used, total_weight = sum(used.values()), sum(weights.values())
    for tenant, weight in weights.items():
        share, want = used[tenant] / total_used, weight / total_weight
        assert abs(share - want) / want < 0.10, (tenant, share, want, used)
    grants = sched.grants("train")
    assert grants["d"] > grants["a"]  # short jobs get more grants for the same share


def test_a_tenant_back_from_idle_banks_no_credit():
    sched, clock, _ = _scheduler(aging_s=10_000)
    _simulate(sched, clock, tenants=["a", "b"], until=100)
    sched.cancel("train", "a")
    sched.cancel("train", "b")
    # "late" joins now: it starts at the class's virtual time, not at 0, so it cannot take 100 s in a row
    order = _simulate(sched, clock, tenants=["a", "b", "late"], until=clock.now + 30)
    assert order.count("late") <= len(order) // 3 + 2
    assert order.count("a") >= len(order) // 3 - 2


def test_no_starvation_background_progresses_within_the_aging_bound():
    sched, clock, seen = _scheduler(aging_s=20, wait_bound_s=0)
    sched.set_policy("hi1", priority=PRIORITY_INTERACTIVE)
    sched.set_policy("hi2", priority=PRIORITY_INTERACTIVE)
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    grant_times = []
    original = sched.pick

    def pick(resource, k=1, among=None):
        chosen = original(resource, k, among)
        if "bg" in chosen:
            grant_times.append(clock.now)
        return chosen

    sched.pick = pick
    _simulate(sched, clock, tenants=["hi1", "hi2", "bg"], until=1000)
    assert len(grant_times) >= 1000 / (20 + 2) - 2  # served about every aging_s (+ one job)
    gaps = [b - a for a, b in zip(grant_times, grant_times[1:])]
    assert max(gaps) <= 20 + 1.5 + 1.5 + 1e-9  # its wait after each job never exceeds aging_s + a job
    assert any(f["reason"] == "aged" for name, f in seen if name == events.SCHEDULER_DECISION)


def test_a_wait_over_the_bound_is_reported_once():
    sched, clock, seen = _scheduler(aging_s=1000, wait_bound_s=5)
    sched.set_policy("bg", priority=PRIORITY_BACKGROUND)
    sched.wait("train", "hi")
    sched.wait("train", "bg")
    clock.now = 4
    assert sched.check_waits("train") == []
    clock.now = 6
    assert sched.check_waits("train") == ["bg", "hi"]
    assert sched.check_waits("train") == []
    late = [f for name, f in seen if name == events.SCHEDULER_WAIT_EXCEEDED]
    assert sorted(f["tenant"] for f in late) == ["bg", "hi"]
    clock.now = 60
    sched.pick("train")
    assert len([1 for name, _ in seen if name == events.SCHEDULER_WAIT_EXCEEDED]) == 2  # once per wait
    bg = next(f for f in late if f["tenant"] == "bg")
    assert bg["wait_s"] == 6 and bg["bound_s"] == 5 and bg["priority"] == PRIORITY_BACKGROUND


def test_a_priority_change_takes_effect_at_the_next_decision():
    sched, clock, seen = _scheduler(aging_s=1000)
    sched.wait("train", "a")
    sched.wait("train", "b")
    assert sched.waiting("train") == ["a", "b"]
    sched.set_policy("b", priority=PRIORITY_INTERACTIVE)
    assert sched.pick("train") == ["b"]
    changed = [f for name, f in seen if name == events.SCHEDULER_POLICY_CHANGED]
    assert changed == [{"tenant": "b", "priority": 1, "weight": 1.0, "old_priority": 0, "old_weight": 1.0}]


def test_bad_weights_and_bounds_fail_clearly():
    with pytest.raises(ValueError, match="weight must be > 0"):
        Scheduler().set_policy("a", weight=0)
    with pytest.raises(ValueError, match="aging_s must be > 0"):
        Scheduler(aging_s=0)
