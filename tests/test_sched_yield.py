"""Yielding to a higher class (Scheduler.yields_to / hold / unhold, YieldGate) on a simulated clock."""

from __future__ import annotations

import asyncio

import pytest

from clora import events
from clora.errors import ConfigError
from clora.sched import DECODE, PRIORITY_BACKGROUND, PRIORITY_INTERACTIVE, TRAIN, Scheduler, YieldGate
from clora.testing import RecordingLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _two(mode: str = "device", **kw):
    """An interactive tenant "i" and a background one "b"."""
    clock, seen = Clock(), []
    sched = Scheduler(clock=clock, log=RecordingLog(seen), yield_to_higher=mode, **kw)
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    sched.set_policy("b", PRIORITY_BACKGROUND)
    return sched, clock, seen


def _decoding(sched: Scheduler, tenant: str) -> None:
    sched.wait(DECODE, tenant)
    assert sched.pick(DECODE, among=[tenant]) == [tenant]


@pytest.mark.parametrize("mode, on_decode, on_train", [
    ("device", True, True), ("engine", True, False), ("never", False, False),
])
def test_who_yields_while_the_higher_class_decodes(mode, on_decode, on_train):
    sched, _, _ = _two(mode)
    assert sched.yields_to(DECODE, "b") == [] and sched.yields_to(TRAIN, "b") == []  # nobody active yet
    _decoding(sched, "i")
    assert sched.yields_to(DECODE, "b") == (["i"] if on_decode else [])
    assert sched.yields_to(TRAIN, "b") == (["i"] if on_train else [])
    assert sched.yields_to(DECODE, "i") == []  # never to a lower class


@pytest.mark.parametrize("mode, held", [("device", True), ("engine", False), ("never", False)])
def test_a_pending_or_running_higher_step_holds_back_engine_requests_only_under_device(mode, held):
    sched, _, _ = _two(mode)
    sched.wait(TRAIN, "i")  # a pending step is activity
    assert sched.yields_to(DECODE, "b") == (["i"] if held else [])
    sched.pick(TRAIN)  # running too
    assert sched.yields_to(DECODE, "b") == (["i"] if held else [])
    assert sched.yields_to(TRAIN, "b") == (["i"] if held else [])


def test_equal_classes_never_yield_to_each_other():
    sched, _, _ = _two()
    sched.set_policy("b2", PRIORITY_BACKGROUND)
    _decoding(sched, "b2")
    assert sched.yields_to(DECODE, "b") == []


def test_activity_lingers_then_lets_the_lower_class_go():
    sched, clock, _ = _two(linger_s=2.0)
    _decoding(sched, "i")
    clock.now = 10.0
    sched.charge(DECODE, "i", 10.0)  # its last request finished
    assert sched.yields_to(DECODE, "b") == ["i"]  # a gap inside its RL step
    assert sched.next_yield_change() == pytest.approx(12.0)
    clock.now = 11.9
    assert sched.yields_to(DECODE, "b") == ["i"]
    clock.now = 12.0
    assert sched.yields_to(DECODE, "b") == []
    assert sched.next_yield_change() is None


def test_a_hold_ages_goes_through_and_its_clock_restarts():
    sched, clock, seen = _two(aging_s=30.0, wait_bound_s=20.0)
    _decoding(sched, "i")
    sched.hold(DECODE, "b")
    sched.hold(DECODE, "b")  # a second request joins the same hold: one event
    assert [e for e, _ in seen].count(events.SCHEDULER_YIELDED) == 1
    yielded = next(f for e, f in seen if e == events.SCHEDULER_YIELDED)
    assert yielded["tenant"] == "b" and yielded["to"][0]["tenant"] == "i" and yielded["to"][0]["active"] == [DECODE]
    assert sched.next_yield_change() == pytest.approx(20.0)  # the wait bound comes first
    clock.now = 20.5
    assert sched.check_waits(DECODE) == ["b"]  # held back past the bound: said so, once
    assert sched.check_waits(DECODE) == []
    assert sched.next_yield_change() == pytest.approx(30.0)
    clock.now = 30.0
    assert sched.yields_to(DECODE, "b") == []  # aged: goes although "i" is still active
    sched.unhold(DECODE, "b")
    assert sched.yields_to(DECODE, "b") == []  # still the same hold
    sched.unhold(DECODE, "b")
    resumed = [f for e, f in seen if e == events.SCHEDULER_RESUMED]
    assert len(resumed) == 1 and resumed[0]["reason"] == "aged" and resumed[0]["held_s"] == 30.0
    clock.now = 30.5
    assert sched.yields_to(DECODE, "b") == ["i"]  # a new hold would start its own clock


def test_a_priority_change_or_a_removal_frees_the_held_and_tells_listeners():
    sched, _, _ = _two()
    _decoding(sched, "i")
    told = []
    unsubscribe = sched.subscribe(lambda: told.append(1))
    sched.set_policy("i", PRIORITY_BACKGROUND)
    assert told and sched.yields_to(DECODE, "b") == []
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    assert sched.yields_to(DECODE, "b") == ["i"]
    n = len(told)
    sched.remove("i")
    assert len(told) == n + 1 and sched.yields_to(DECODE, "b") == []
    unsubscribe()
    sched.set_policy("b", 0)
    assert len(told) == n + 1


def test_bad_settings_fail_clearly():
    with pytest.raises(ConfigError, match="yield_to_higher"):
        Scheduler(yield_to_higher="sometimes")
    with pytest.raises(ConfigError, match="linger_s"):
        Scheduler(linger_s=-1)


# ---------------------------------------------------------------- the asyncio gate (real clock, short times)

async def test_the_gate_holds_until_the_higher_class_is_idle_and_its_linger_ended():
    sched, seen = Scheduler(linger_s=0.05, log=RecordingLog(out := [])), out
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    sched.set_policy("b", PRIORITY_BACKGROUND)
    gate = YieldGate(sched)
    _decoding(sched, "i")
    waits = [asyncio.create_task(gate.clear(DECODE, "b")) for _ in range(2)]
    await asyncio.sleep(0.02)
    assert not any(w.done() for w in waits) and gate.waiting() == ["b", "b"]
    sched.charge(DECODE, "i", 0.02)  # idle now; lingers 0.05 s
    await asyncio.sleep(0.02)
    assert not any(w.done() for w in waits)
    await asyncio.wait_for(asyncio.gather(*waits), 1.0)  # woken by the linger timer, no poll
    assert gate.waiting() == [] and sched._listeners == []
    assert [e for e, _ in seen].count(events.SCHEDULER_YIELDED) == 1
    assert [f["reason"] for e, f in seen if e == events.SCHEDULER_RESUMED] == ["clear"]


async def test_the_gate_wakes_on_a_priority_change_and_lets_an_aged_hold_through():
    sched = Scheduler(aging_s=0.1)
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    sched.set_policy("b", PRIORITY_BACKGROUND)
    sched.set_policy("c", PRIORITY_BACKGROUND)
    gate = YieldGate(sched)
    _decoding(sched, "i")
    b = asyncio.create_task(gate.clear(DECODE, "b"))
    await asyncio.sleep(0.01)
    sched.set_policy("b", PRIORITY_INTERACTIVE)
    await asyncio.wait_for(b, 0.05)  # at once, not after aging
    c = asyncio.create_task(gate.clear(DECODE, "c"))
    await asyncio.wait_for(c, 1.0)  # "i" never stops: aging lets it through
    assert sched.yields_to(DECODE, "c") == ["b", "i"]  # and the next request waits again


async def test_cancelling_a_held_wait_gives_up_the_hold():
    sched, seen = Scheduler(log=RecordingLog(out := [])), out
    sched.set_policy("i", PRIORITY_INTERACTIVE)
    sched.set_policy("b", PRIORITY_BACKGROUND)
    gate = YieldGate(sched)
    _decoding(sched, "i")
    b = asyncio.create_task(gate.clear(DECODE, "b"))
    await asyncio.sleep(0.01)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert gate.waiting() == [] and sched._listeners == []
    assert [f["reason"] for e, f in seen if e == events.SCHEDULER_RESUMED] == ["cancelled"]
    assert sched._held_rows(DECODE, 0.0) == []


async def test_a_slot_waiter_that_must_yield_gets_no_free_slot_until_the_higher_class_is_idle():
    from clora.sched.gate import SlotGate

    sched = Scheduler(linger_s=0.05, aging_s=1000)
    for tenant, priority in (("i", PRIORITY_INTERACTIVE), ("x", PRIORITY_BACKGROUND), ("b", PRIORITY_BACKGROUND)):
        sched.set_policy(tenant, priority)
    gate = SlotGate(sched, DECODE, 1)
    await gate.acquire("x")
    b = asyncio.create_task(gate.acquire("b"))  # queued before the interactive tenant became active
    await asyncio.sleep(0.01)
    _decoding(sched, "i")  # (on another replica's gate)
    gate.release("x")
    await asyncio.sleep(0.1)
    assert not b.done() and gate.free == 1 and sched.held(DECODE, "b")  # the free slot stays free
    sched.charge(DECODE, "i", 0.1)
    await asyncio.wait_for(b, 1.0)  # woken by the change and the linger timer
    assert gate.holds("b") and not sched.held(DECODE, "b") and sched._listeners == []
