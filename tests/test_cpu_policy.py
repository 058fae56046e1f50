"""The trainer's CPU policy: its threads confined to some cores and/or yielding contested cores to the engine."""

from __future__ import annotations

import os
import threading

import pytest

from clora.config import TrainerConfig, parse_cpu_list
from clora.trainer.cpu_policy import apply_thread_policy, thread_policy
from clora.errors import ConfigError


def test_cpu_lists_parse_like_taskset():
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5}
    assert parse_cpu_list("1") == {1}
    for bad in ("", "a", "3-1", "-1", "1,,2", "\u00b2", "0-\u00b2", "\u0663"):  # superscript 2, Arabic-Indic 3
        with pytest.raises(ConfigError, match="bad CPU list"):
            parse_cpu_list(bad)


def _in_thread(fn):
    """Run fn in a fresh thread; return what it returned (or raise what it raised)."""
    box: dict[str, object] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def test_the_policy_applies_to_the_calling_thread_and_the_threads_it_starts():
    cpu = min(os.sched_getaffinity(0))
    before = thread_policy()

    def confined():
        apply_thread_policy(cpus=str(cpu), nice=5)
        mine = thread_policy()
        child = _in_thread(thread_policy)  # e.g. torch's intra-op threads, started later from this thread
        return mine, child

    mine, child = _in_thread(confined)
    assert mine == {"cpus": [cpu], "nice": before["nice"] + 5} and child == mine
    assert thread_policy() == before  # the caller's own thread is untouched


def test_no_policy_changes_nothing_and_nice_stops_at_19():
    before = thread_policy()
    assert _in_thread(lambda: (apply_thread_policy(), thread_policy())[1]) == before
    assert _in_thread(lambda: (apply_thread_policy(nice=19), apply_thread_policy(nice=19),
                               thread_policy())[2])["nice"] == 19


def test_cpus_outside_the_process_affinity_are_refused():
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match="may only use CPUs"):
        _in_thread(lambda: apply_thread_policy(cpus=str(outside)))


def test_trainer_config_validates_the_policy():
    assert TrainerConfig(cpus="0-1", nice=10).nice == 10
    with pytest.raises(ConfigError, match="trainer.nice"):
        TrainerConfig(nice=20)
    with pytest.raises(ConfigError, match="trainer.cpus"):
        TrainerConfig(cpus="x")
